"""What every fixed-point solver shares: per-sample residuals, the best iterate, stopping rules.

All solvers work on a batch of flattened states ``z`` of shape (B, D) and look for ``z = f(z)``.
The residual of sample b is ``||f(z_b) - z_b||`` (absolute) or that divided by ``||f(z_b)||``
(relative). A sample stops moving once its residual is below ``eps`` (it has converged) or once
it has diverged (a non-finite value, or a relative or absolute residual ``div_factor`` times its
best); the solver
returns, per sample, the iterate with the lowest residual seen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

Tensor = torch.Tensor
FixedPointFn = Callable[[Tensor], Tensor]
#: (rows (b,) of the caller's batch) -> f on those samples alone, (b, D) -> (b, D)
FixedPointFnFactory = Callable[[Tensor], FixedPointFn]
#: (images f(z) (b, D) of the samples in the solve, their rows (b,) in the caller's batch) -> done (b,) bool
ExitRule = Callable[[Tensor, Tensor], Tensor]


@dataclass
class SampleExit:
    """How samples stop and leave a solve before the others (evaluation only, no autograd).

    Attributes:
        restrict: ``rows -> f`` on those rows: given the (b,) indices, into the caller's batch, of the
            samples still in the solve, the map (b, D) -> (b, D) for them alone (their input injection,
            masks ...). ``None``: samples that stop are frozen in the whole batch, as without an exit.
        rule: an extra stopping test, called after each evaluation of f with the lowest-residual
            iterate's image of each sample in the solve (b, D) and the samples' rows (b,); a sample is
            done where it returns True (besides the residual tolerance ``eps``). A stateful rule keeps
            its state per row of the caller's batch, so it sees the same history either way.
    """

    restrict: Optional[FixedPointFnFactory] = None
    rule: Optional[ExitRule] = None

_TINY = 1e-12

#: The solver statistics that a training or evaluation loop averages and logs, in the order it
#: shows them: the forward solve (``f_*``), the adjoint solve (``b_*``, only after a backward pass)
#: and whether the adjoint solve fell back to the one-step gradient. A call's
#: :class:`mdeq.modules.EquilibriumInfo` holds these entries and more (traces, ``mode``,
#: convergence flags); see :meth:`SolverResult.stats`.
SOLVER_KEYS = ("f_steps", "f_abs", "f_rel", "b_steps", "b_abs", "b_rel", "b_fallback")


def solver_memory(memory: int, threshold: int) -> int:
    """m, the history a limited-memory solver keeps: ``memory``, or ``threshold`` when ``memory <= 0``
    (every step, as the original implementation)."""
    return int(memory) if memory > 0 else int(threshold)


@dataclass
class SolverResult:
    """The outcome of a fixed-point solve.

    Attributes:
        z: (B, D) the lowest-residual iterate of each sample.
        fz: (B, D) ``f(z)``, one free fixed-point step further (what an MDEQ outputs).
        steps: evaluations of f made.
        abs_residual: ``||f(z) - z||`` over the whole batch at ``z``.
        rel_residual: ``abs_residual / ||f(z)||``.
        trace: relative residual of the current iterate after each evaluation.
        abs_trace: absolute residual of the current iterate after each evaluation.
        converged: every sample reached its tolerance.
        diverged: some sample was stopped by the divergence guard.
        improved: some sample improved on the starting point.
        sample_evals: (B,) long, the evaluations of f paid for each sample: ``steps`` for every one
            of them, unless a :class:`SampleExit` with ``restrict`` let samples leave the solve earlier.
    """

    z: Tensor
    fz: Tensor
    steps: int
    abs_residual: float
    rel_residual: float
    trace: List[float] = field(default_factory=list)
    abs_trace: List[float] = field(default_factory=list)
    converged: bool = False
    diverged: bool = False
    improved: bool = True
    sample_evals: Optional[Tensor] = None

    def stats(self, prefix: str) -> dict:
        """A flat dict for logging, keys prefixed (e.g. ``f_steps``, ``f_rel``)."""
        return {f"{prefix}_steps": self.steps, f"{prefix}_abs": self.abs_residual,
                f"{prefix}_rel": self.rel_residual, f"{prefix}_converged": self.converged,
                f"{prefix}_diverged": self.diverged}


class IterateTracker:
    """Keeps the best iterate per sample and decides which samples still move.

    Args:
        z0: (B, D) the starting point (its residual is measured on the first :meth:`update`).
        eps: tolerance on the residual chosen by ``stop_mode``.
        stop_mode: ``'rel'`` or ``'abs'``.
        div_factor: a sample whose residual exceeds ``div_factor`` times its best is stopped.
        restart: if > 0, :attr:`lost` marks the active samples whose residual exceeds ``restart``
            times their best, and the diverged ones (a solver puts them back at their best iterate).
        sample_exit: per-sample exit (:class:`SampleExit`); with its ``restrict``, the samples that
            stop leave: after an :meth:`update` that removed some, :attr:`keep` (b,) indexes the
            samples that stay among those the update saw, :attr:`rows` their rows in the caller's
            batch, and the solver narrows its own per-sample state with :meth:`select`.

    After each :meth:`update`: ``last_g`` (B, D) is ``f(z) - z`` in z's dtype, ``last_abs`` (B,) its
    per-sample norm (float32), ``any_lost`` and
    ``any_diverged`` are host booleans fetched with the one stopping test, so that a solver can
    skip its restore work without waiting on the device again.
    """

    def __init__(self, z0: Tensor, eps: float, stop_mode: str = "rel", div_factor: float = 1e3,
                 restart: float = 0.0, sample_exit: Optional[SampleExit] = None) -> None:
        if stop_mode not in ("rel", "abs"):
            raise ValueError(f"stop_mode must be 'rel' or 'abs', got {stop_mode!r}")
        bsz = z0.shape[0]
        self.eps, self.stop_mode, self.div_factor, self.restart = eps, stop_mode, div_factor, restart
        self.z0 = z0
        self.best_z = self.best_fz = z0.detach()     # replaced (not written into) by update
        inf = torch.full((bsz,), float("inf"), device=z0.device, dtype=torch.float32)
        self.best_res = inf.clone()
        self.best_abs = inf.clone()
        self.best_fnorm = torch.ones_like(inf)
        self.min_abs = inf.clone()
        self.diverged = torch.zeros(bsz, dtype=torch.bool, device=z0.device)
        self.active = torch.ones_like(self.diverged)
        self.trace: List[float] = []
        self.abs_trace: List[float] = []
        self.updates = 0
        self.improved_after_start = torch.zeros_like(self.diverged)
        self.lost = torch.zeros_like(self.diverged)
        self.any_lost = self.any_diverged = False
        self.all_active = True
        self.last_g = z0
        self.exit_rule = sample_exit.rule if sample_exit is not None else None
        self.leaving = sample_exit is not None and sample_exit.restrict is not None
        self.rows = torch.arange(bsz, device=z0.device)    # the caller's rows of the samples in the solve
        self.keep: Optional[Tensor] = None
        self._out: Optional[_Finished] = None

    def update(self, z: Tensor, fz: Tensor, g_out: Optional[Tensor] = None) -> bool:
        """Record the residual of ``z`` (with ``fz = f(z)``); returns True while some sample is active.

        ``g = fz - z`` is written into ``g_out`` (B, D) when given and kept as :attr:`last_g`. When every
        sample improved (the usual case), the best iterate *becomes* ``z`` and ``fz`` without a copy:
        a solver must not write into tensors it has passed here.
        """
        self.last_g = g = torch.sub(fz, z, out=g_out) if g_out is not None else fz - z
        abs_b = g.float().norm(dim=1)
        fnorm_b = fz.float().norm(dim=1)
        rel_b = abs_b / (fnorm_b + _TINY)
        res_b = rel_b if self.stop_mode == "rel" else abs_b
        finite = torch.isfinite(res_b)
        better = finite & (res_b < self.best_res)
        if self.updates > 0:
            self.improved_after_start |= better
        self.last_res, self.last_abs = res_b, abs_b
        self.best_res = torch.where(better, res_b, self.best_res)
        self.best_abs = torch.where(better, abs_b, self.best_abs)
        self.best_fnorm = torch.where(better, fnorm_b, self.best_fnorm)
        # the absolute residual is watched too: a relative one can shrink while z runs off to infinity
        self.min_abs = torch.minimum(self.min_abs, torch.nan_to_num(abs_b, nan=float("inf")))
        blown = ~finite | (res_b > self.div_factor * self.best_res) | (abs_b > self.div_factor * self.min_abs)
        self.diverged |= blown & self.active
        self.active = self.active & ~blown & (self.best_res >= self.eps)
        if self.exit_rule is not None:
            # the rule reads the image that the solve would return now: the lowest-residual one's
            self.best_fz = torch.where(better[:, None], fz.detach(), self.best_fz)
            self.active = self.active & ~self.exit_rule(self.best_fz, self.rows)
        self.updates += 1
        cur_abs = torch.nan_to_num(abs_b, nan=float("inf")).square().sum().sqrt()
        cur_rel = cur_abs / (torch.nan_to_num(fnorm_b).square().sum().sqrt() + _TINY)
        flags = [cur_abs, cur_rel, self.active.any(), self.active.all(), self.diverged.any(), better.all(),
                 better.any()]
        if self.restart > 0:
            self.lost = (self.active & (res_b > self.restart * self.best_res)) | self.diverged
            flags.append(self.lost.any())
        values = torch.stack([v.float() for v in flags]).tolist()   # the one wait for the device per step
        cur_abs, cur_rel = values[0], values[1]
        any_active, self.all_active, self.any_diverged, all_better, any_better = (v > 0 for v in values[2:7])
        self.any_lost = self.restart > 0 and values[7] > 0
        if all_better:      # keep references: no (B, D) copies
            self.best_z, self.best_fz = z.detach(), fz.detach()
        elif any_better:
            self.best_z = torch.where(better[:, None], z.detach(), self.best_z)
            if self.exit_rule is None:      # else already taken above
                self.best_fz = torch.where(better[:, None], fz.detach(), self.best_fz)
        self.abs_trace.append(cur_abs)
        self.trace.append(cur_rel)
        self.keep = None
        if self.leaving and any_active and not self.all_active:
            self._leave()
        return bool(any_active)

    # ------------------------------------------------------------------ samples leaving the solve
    _PER_SAMPLE = ("best_z", "best_fz", "best_res", "best_abs", "best_fnorm", "min_abs", "diverged", "active",
                   "improved_after_start", "lost", "last_g", "last_res", "last_abs")

    def _leave(self) -> None:
        """Store the result of the samples that stopped, keep the others (:attr:`keep`, :attr:`rows`)."""
        if self._out is None:
            self._out = _Finished.like(self.z0, self.best_z.dtype)
        self._out.store(self, ~self.active, self.updates)
        self.keep = self.active.nonzero().squeeze(1)
        for name in self._PER_SAMPLE:
            setattr(self, name, getattr(self, name)[self.keep])
        self.rows = self.rows[self.keep]
        self.all_active, self.any_diverged = True, False    # the diverged ones have left

    def select(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        """The rows :attr:`keep` of each (B, ...) tensor (the samples that stay after the last update)."""
        return tuple(t[self.keep] for t in tensors)

    def restore_diverged(self, z: Tensor) -> Tensor:
        """Put diverged samples back at their best iterate (so that they stay finite and frozen)."""
        if not self.any_diverged:
            return z
        return torch.where(self.diverged[:, None], self.best_z.to(z.dtype), z)

    def result(self, steps: int) -> SolverResult:
        """The solve's :class:`SolverResult` after ``steps`` evaluations of f (every sample's, also of
        those that left)."""
        if self._out is not None:        # some samples left: the rest finish now, at ``steps``
            out = self._out
            out.store(self, torch.ones_like(self.active), steps)
            self.best_z, self.best_fz, self.best_res, self.best_abs = out.z, out.fz, out.res, out.abs
            self.best_fnorm, self.diverged, self.improved_after_start = out.fnorm, out.diverged, out.improved
            sample_evals = out.evals
        else:
            sample_evals = torch.full((self.z0.shape[0],), steps, dtype=torch.long, device=self.z0.device)
        abs_all = self.best_abs.square().sum().sqrt()
        rel_all = abs_all / (self.best_fnorm.square().sum().sqrt() + _TINY)
        abs_all, rel_all, conv, div, imp = torch.stack([
            abs_all, rel_all, (self.best_res < self.eps).all().float(), self.diverged.any().float(),
            self.improved_after_start.any().float()]).tolist()
        # never hand the caller's own starting tensor back as the solution
        best_z = self.best_z.clone() if self.best_z.data_ptr() == self.z0.data_ptr() else self.best_z
        best_fz = self.best_fz.clone() if self.best_fz.data_ptr() == self.z0.data_ptr() else self.best_fz
        return SolverResult(z=best_z, fz=best_fz, steps=steps, abs_residual=abs_all, rel_residual=rel_all,
                            trace=self.trace, abs_trace=self.abs_trace, converged=bool(conv),
                            diverged=bool(div), improved=bool(imp), sample_evals=sample_evals)


@dataclass
class _Finished:
    """The results of the samples that have left a solve, in the caller's rows (see :class:`SampleExit`)."""

    z: Tensor
    fz: Tensor
    res: Tensor
    abs: Tensor
    fnorm: Tensor
    diverged: Tensor
    improved: Tensor
    evals: Tensor

    @classmethod
    def like(cls, z0: Tensor, dtype: torch.dtype) -> "_Finished":
        bsz = z0.shape[0]
        vec = z0.new_empty(bsz, dtype=torch.float32)
        flag = torch.zeros(bsz, dtype=torch.bool, device=z0.device)
        return cls(z=z0.new_empty(z0.shape, dtype=dtype), fz=z0.new_empty(z0.shape, dtype=dtype), res=vec,
                   abs=vec.clone(), fnorm=vec.clone(), diverged=flag, improved=flag.clone(),
                   evals=torch.zeros(bsz, dtype=torch.long, device=z0.device))

    def store(self, tracker: IterateTracker, which: Tensor, evals: int) -> None:
        """Copy the samples ``which`` (b,) bool of ``tracker`` (its current rows) in, having paid ``evals``."""
        rows = tracker.rows[which]
        self.z[rows] = tracker.best_z[which].to(self.z.dtype)
        self.fz[rows] = tracker.best_fz[which].to(self.fz.dtype)
        self.res[rows] = tracker.best_res[which]
        self.abs[rows] = tracker.best_abs[which]
        self.fnorm[rows] = tracker.best_fnorm[which]
        self.diverged[rows] = tracker.diverged[which]
        self.improved[rows] = tracker.improved_after_start[which]
        self.evals[rows] = evals
