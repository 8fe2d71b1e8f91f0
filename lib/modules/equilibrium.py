"""The equilibrium layer: z* = f(z*) for any map f on flattened (B, D) states, with its backward.

:class:`EquilibriumLayer` solves the fixed point with a forward solver (no autograd) and connects
the result to the graph by the configured backward: the implicit one (an adjoint solve in an
autograd hook, :func:`~mdeq.modules.implicit.attach_implicit_backward`), phantom gradients or the
Jacobian-free one-step gradient (:func:`~mdeq.modules.implicit.attach_phantom_backward`), or, with
the ``reversible`` forward solver, the exact gradient of its coupled steps, rebuilt backwards
(:mod:`~mdeq.modules.reversible`). Or, as a warm-up, it applies f ``depth`` times from z0 and lets
autograd differentiate the stack.

Each call returns ``(z, info)``: :class:`EquilibriumInfo` says what that call did. Its backward
fields are filled when autograd runs the backward, in that same object, so a training loop reads
the forward statistics after the forward and the backward ones after ``loss.backward()``::

    layer = EquilibriumLayer("anderson", f_thres=30, b_thres=30)
    z, info = layer(lambda z: torch.tanh(z @ W.T + x @ U.T), torch.zeros(B, D))
    loss(z).backward()
    info.scalars()   # {'f_steps': ..., 'f_rel': ..., 'b_steps': ..., 'b_fallback': 0.0, ...}
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..solvers import (SOLVER_KEYS, ReversibleResult, SampleExit, SolverFn, SolverResult, SolverWorkspace, check_beta,
                       get_solver, option_names, resolve_solver, reversible, solver_options)
from .implicit import attach_implicit_backward, attach_phantom_backward
from .reversible import DriftWarning, attach_reversible_backward, solve_reversible
from .jacobian import hutchinson_jac_loss, spectral_radius

logger = logging.getLogger(__name__)
Tensor = torch.Tensor
FixedPointMap = Callable[[Tensor], Tensor]

#: what a call computes: the equilibrium by the solvers (with the configured backward), or the
#: warm-up's ``depth`` weight-tied applications of f from z0 (ordinary backprop)
MODES = ("equilibrium", "unrolled")
#: the ``mode`` of the info that a network without an equilibrium layer returns (an explicit baseline):
#: no solver ran, so no solver statistic is set
EXPLICIT = "explicit"
#: the backward of the equilibrium: the adjoint solve, phantom gradients, the one-step gradient, the
#: reversible backward (exact through the ``reversible`` forward solver's steps)
GRAD_MODES = ("implicit", "phantom", "jfb", "reversible")
#: the numeric statistics worth logging, in the order they are shown: the solvers', the Jacobian
#: regularisation term, and the reversible solver's evaluations of f and backward reconstruction error
LOGGED_KEYS = SOLVER_KEYS + ("jac_loss", "f_evals", "b_rev_error")
#: a solver by name ('broyden', 'anderson', 'fixed_point') or as a callable; a pair is (forward, backward)
SolverChoice = Union[str, SolverFn, Tuple[Union[str, SolverFn], Union[str, SolverFn]]]


@dataclass(eq=False)
class EquilibriumInfo:
    """What one call of :class:`EquilibriumLayer` did.

    Attributes:
        mode: ``'equilibrium'`` or ``'unrolled'``; ``'explicit'`` from a network that has no
            equilibrium layer (:data:`EXPLICIT`): then nothing else is set.
        f_steps: evaluations of f by the forward solver (the depth when unrolled).
        f_abs, f_rel: the forward solver's final absolute / relative residual (batch).
        f_diverged: some sample hit the forward solver's divergence guard.
        f_trace: the forward solver's relative residual after each evaluation.
        jac_loss: the Hutchinson estimate of ||J_f||_F^2 / numel, a scalar tensor with graph, or None.
        spectral_radius: the power-method estimate of rho(J_f(z*)) (evaluation only), or None.
        b_steps: the backward's steps: adjoint-solver steps (implicit), or the applications of f
            it differentiates through (phantom / JFB, set at once). Implicit: None until autograd
            runs the backward, which fills ``b_*`` into this object.
        b_abs, b_rel, b_trace: the adjoint solve's residuals, as the forward ones.
        b_fallback: the adjoint solve did not improve on dl/dz, whose one-step gradient was used.
        f_evals: the reversible solver's evaluations of f (2 per coupled step + 1; ``f_steps`` counts
            the coupled steps there); None for the other solvers, whose steps are their evaluations.
        f_sample_evals: (B,) long, the forward solve's evaluations of f per sample (fewer than
            ``f_steps`` for the samples that left a solve with a per-sample exit); None when unrolled.
        b_rev_error: the reversible backward's reconstruction error, set when it has run:
            max(||y_0' - z0||, ||z_0' - z0||) / max(||z0||, ||z_N||) for the start (y_0', z_0') it
            rebuilt (see :func:`mdeq.modules.reversible.reconstruction_error`).
    """

    mode: str
    f_steps: Optional[int] = None
    f_abs: Optional[float] = None
    f_rel: Optional[float] = None
    f_diverged: Optional[bool] = None
    f_trace: Optional[List[float]] = None
    jac_loss: Optional[Tensor] = None
    spectral_radius: Optional[float] = None
    # filled by the backward (implicit), or by the forward (phantom / JFB: b_steps)
    b_steps: Optional[int] = None
    b_abs: Optional[float] = None
    b_rel: Optional[float] = None
    b_fallback: Optional[bool] = None
    b_trace: Optional[List[float]] = None
    f_evals: Optional[int] = None
    b_rev_error: Optional[float] = None
    f_sample_evals: Optional[Tensor] = None

    LOGGED_KEYS: ClassVar[Tuple[str, ...]] = LOGGED_KEYS

    @classmethod
    def from_forward(cls, result: SolverResult) -> "EquilibriumInfo":
        """The info of an equilibrium call whose forward solve gave ``result``."""
        forward = {k: v for k, v in result.stats("f").items() if k in cls._names()}   # f_steps, f_abs ...
        evals = result.evaluations if isinstance(result, ReversibleResult) else None
        return cls(mode="equilibrium", f_trace=result.trace, f_evals=evals, f_sample_evals=result.sample_evals,
                   **forward)

    def record_backward(self, result: SolverResult, fallback: bool) -> None:
        """Fill in the adjoint solve's ``result``; ``fallback``: its start dl/dz was used instead."""
        self.b_steps, self.b_abs, self.b_rel = result.steps, result.abs_residual, result.rel_residual
        self.b_fallback, self.b_trace = bool(fallback), result.trace

    def record_reversible(self, steps: int, error: float) -> None:
        """Fill in the reversible backward's ``steps`` (backpropagated) and reconstruction ``error``."""
        self.b_steps, self.b_rev_error = int(steps), float(error)

    def get(self, key: str) -> Optional[float]:
        """Entry ``key`` as a float (``jac_loss`` detached, a bool as 0 / 1); None when not set or
        not a number (a trace, the mode). An unknown key is a KeyError."""
        if key not in self._names():
            raise KeyError(f"EquilibriumInfo has no entry {key!r}; entries: {sorted(self._names())}")
        value = getattr(self, key)
        if isinstance(value, Tensor):
            return float(value.detach().float().mean()) if value.numel() else None
        return float(value) if isinstance(value, (int, float)) else None

    def scalars(self) -> Dict[str, float]:
        """``{key: float}`` of the :data:`LOGGED_KEYS` that are set, in that order."""
        return {k: v for k, v in ((k, self.get(k)) for k in LOGGED_KEYS) if v is not None}

    def stats(self) -> Dict[str, Any]:
        """The entries that are set, traces left out, tensors (``jac_loss``, ``f_sample_evals``) as their
        mean (for reports and JSON)."""
        out: Dict[str, Any] = {}
        for name in self._names():
            value = getattr(self, name)
            value = self.get(name) if isinstance(value, Tensor) else value
            if value is not None and not name.endswith("trace"):
                out[name] = value
        return out

    def evaluations_per_sample(self, batch: int) -> Optional[Tensor]:
        """(batch,) long: the evaluations of f that each sample cost: :attr:`f_sample_evals`, or the
        call's evaluations (``f_evals``, else ``f_steps``: the unrolled depth) for every sample; None for
        an explicit network's info."""
        if self.f_sample_evals is not None:
            return self.f_sample_evals
        count = self.f_evals if self.f_evals is not None else self.f_steps
        return None if count is None else torch.full((batch,), int(count), dtype=torch.long)

    @property
    def diverged(self) -> bool:
        """Whether the forward solver hit its divergence guard for some sample."""
        return bool(self.f_diverged)

    def describe(self) -> str:
        """``mode=... f_steps=... f_rel=... b_rel=... b_fallback=...`` for the logs."""
        parts = [f"mode={self.mode}"] + [f"{k}={v:.4g}" for k, v in self.scalars().items()]
        if self.f_diverged is not None:
            parts.append(f"f_diverged={self.diverged}")
        return " ".join(parts)

    @classmethod
    def _names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


class EquilibriumLayer(nn.Module):
    """z* = f(z*) on (B, D) states, forward and backward; no parameters (f carries them).

    Args:
        f_solver, b_solver: the forward / backward solver, by name ('broyden', 'anderson',
            'fixed_point') or as a callable (see :mod:`mdeq.solvers`); ``b_solver`` defaults to ``f_solver``.
        f_thres, b_thres: the forward / backward budgets (evaluations of f / VJPs).
        f_eps, b_eps: the stopping tolerances; stop_mode: ``'rel'`` or ``'abs'`` residual.
        memory, beta, lam: the limited-memory solvers' m, Anderson's mixing and regularisation; with the
            ``reversible`` forward solver and no ``rev_beta``, ``beta`` is its relaxation.
        rev_beta: the reversible solver's relaxation, in (0, 2), not 1 (default: ``beta`` when the forward
            solver is reversible, else 0.8); float64_states: it keeps its states in float64 (always when the
            layer is called under autocast, see :meth:`_reversible`).
        workspace: the solvers' reusable scratch memory (a fresh :class:`SolverWorkspace` by default).
        grad: the backward, one of :data:`GRAD_MODES`; phantom_steps, phantom_tau: its k and tau.
            ``'reversible'`` needs the ``reversible`` forward solver (f_thres: its coupled steps).
        depth: the unrolled (warm-up) depth.
        warmup_steps: training steps ``0 <= train_step < warmup_steps`` are unrolled.
        default_mode: what a call that names no ``mode`` computes after the warm-up: ``'equilibrium'``,
            or ``'unrolled'`` for a network that is the weight-tied stack of ``depth`` applications of
            f in training and in evaluation (the unrolled baseline, MODEL.NAME ``mdeq_unrolled``).
        jac_probes: Gaussian probes of the Hutchinson estimate (``jac_loss=True``).
        spectral_radius_iters: power iterations for ``info.spectral_radius`` in evaluation (0: off).
    """

    def __init__(self, f_solver: Union[str, SolverFn] = "broyden", b_solver: Union[str, SolverFn, None] = None,
                 f_thres: int = 30, b_thres: int = 40, *, f_eps: float = 1e-5, b_eps: float = 1e-5,
                 stop_mode: str = "rel", memory: int = 18, beta: float = 1.0, lam: float = 1e-4,
                 rev_beta: Optional[float] = None, float64_states: bool = False,
                 workspace: Optional[SolverWorkspace] = None, grad: str = "implicit", phantom_steps: int = 5,
                 phantom_tau: float = 0.5, depth: int = 5, warmup_steps: int = 0, jac_probes: int = 1,
                 spectral_radius_iters: int = 0, default_mode: str = "equilibrium") -> None:
        super().__init__()
        if grad not in GRAD_MODES:
            raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")
        if default_mode not in MODES:
            raise ValueError(f"default_mode must be one of {MODES}, got {default_mode!r}")
        self.default_mode = default_mode
        self.f_solver = resolve_solver(f_solver)
        self.b_solver = resolve_solver(f_solver if b_solver is None else b_solver)
        self.f_thres, self.b_thres = int(f_thres), int(b_thres)
        self.workspace = SolverWorkspace() if workspace is None else workspace
        # the settings of every solver, per direction; a solve passes its solver only what it takes
        if rev_beta is None:
            rev_beta = beta if _is_reversible(self.f_solver) else 0.8
        common = dict(stop_mode=stop_mode, memory=memory, beta=beta, lam=lam, workspace=self.workspace,
                      rev_beta=rev_beta, float64_states=bool(float64_states))
        self.solver_settings: Dict[str, Dict[str, Any]] = {"f": dict(common, eps=f_eps), "b": dict(common, eps=b_eps)}
        self.grad, self.phantom_steps, self.phantom_tau = grad, int(phantom_steps), float(phantom_tau)
        if grad == "reversible":
            self._check_reversible(self.f_solver)
        elif _is_reversible(self.f_solver) or _is_reversible(self.b_solver):
            check_beta(rev_beta, "rev_beta (the reversible solver's relaxation)")
        self.depth, self.warmup_steps = int(depth), int(warmup_steps)
        self.jac_probes, self.spectral_radius_iters = int(jac_probes), int(spectral_radius_iters)
        self.drift_warning = DriftWarning()   # the reversible backward's reconstruction-error warnings
        self._autocast_f64_said = False       # the reversible solver's float64 states under autocast, logged once

    @classmethod
    def from_config(cls, cfg, default_mode: str = "equilibrium") -> "EquilibriumLayer":
        """The layer of ``cfg.MODEL`` (solvers, budgets, GRAD, NUM_LAYERS ...) and ``cfg.TRAIN.PRETRAIN_STEPS``
        (``default_mode``: see the class)."""
        m = cfg.MODEL
        # resolved here so that an unknown name is a ConfigError naming its key
        return cls(get_solver(m.F_SOLVER, "MODEL.F_SOLVER"), get_solver(m.B_SOLVER, "MODEL.B_SOLVER"),
                   m.F_THRES, m.B_THRES, f_eps=m.F_EPS, b_eps=m.B_EPS, stop_mode=m.STOP_MODE,
                   memory=m.SOLVER_MEMORY, beta=m.ANDERSON_BETA, rev_beta=m.REV_BETA, lam=m.ANDERSON_LAM,
                   float64_states=m.REV_FLOAT64_STATES,
                   grad=m.GRAD, phantom_steps=m.PHANTOM_STEPS, phantom_tau=m.PHANTOM_TAU, depth=m.NUM_LAYERS,
                   warmup_steps=cfg.TRAIN.PRETRAIN_STEPS, jac_probes=m.JAC_PROBES,
                   spectral_radius_iters=m.SPECTRAL_RADIUS_ITERS, default_mode=default_mode)

    def _check_reversible(self, f_solver: SolverFn) -> None:
        """The reversible backward's requirements: the reversible forward solver, an invertible beta."""
        if not _is_reversible(f_solver):
            raise ValueError(f"grad='reversible' needs the 'reversible' forward solver (f_solver), got "
                             f"{getattr(f_solver, '__name__', f_solver)!r}: only its coupled steps can be run backwards")
        check_beta(self.solver_settings["f"]["rev_beta"], "rev_beta (the reversible solver's relaxation)")

    def extra_repr(self) -> str:
        name = lambda s: getattr(s, "__name__", repr(s))  # noqa: E731
        return (f"f_solver={name(self.f_solver)}, b_solver={name(self.b_solver)}, f_thres={self.f_thres}, "
                f"b_thres={self.b_thres}, grad={self.grad}, depth={self.depth}, warmup_steps={self.warmup_steps}, "
                f"default_mode={self.default_mode}")

    # ------------------------------------------------------------------ a call's choices
    def resolve_mode(self, mode: Optional[str] = None, train_step: Optional[int] = None) -> str:
        """``mode`` ('equilibrium' or 'unrolled'), or the warm-up rule for ``train_step``: unrolled for
        ``0 <= train_step < warmup_steps``, else :attr:`default_mode` (the equilibrium unless the layer
        is the unrolled baseline's, which is unrolled in every call that names no mode)."""
        if mode is not None:
            if mode not in MODES:
                raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
            if train_step is not None:
                raise ValueError(f"give mode ({mode!r}) or train_step ({train_step}), not both")
            return mode
        if train_step is not None and 0 <= train_step < self.warmup_steps:
            return "unrolled"
        return self.default_mode

    def call_solvers(self, solver: Optional[SolverChoice] = None) -> Tuple[SolverFn, SolverFn]:
        """(forward, backward) solvers of one call: the configured ones, or the override ``solver``."""
        if solver is None:
            return self.f_solver, self.b_solver
        if isinstance(solver, tuple):
            if len(solver) != 2:
                raise ValueError(f"solver: a pair (forward, backward) expected, got {len(solver)} entries")
            return resolve_solver(solver[0]), resolve_solver(solver[1])
        return resolve_solver(solver), resolve_solver(solver)

    def solver_kwargs(self, direction: str, solver: Optional[SolverFn] = None, **overrides: Any) -> Dict[str, Any]:
        """The options of the forward (``direction='f'``) or backward (``'b'``) solve for ``solver``
        (default: the configured one): the layer's settings that this solver takes, then
        ``overrides`` (e.g. ``eps=0.0``). An override the solver does not take is a ValueError."""
        if direction not in self.solver_settings:
            raise ValueError(f"solver direction must be 'f' or 'b', got {direction!r}")
        solver = (self.f_solver if direction == "f" else self.b_solver) if solver is None else solver
        names = option_names(solver)
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise ValueError(f"solver option(s) {unknown} not taken by {getattr(solver, '__name__', solver)!r} "
                             f"(it takes {list(names)})")
        return {**solver_options(solver, self.solver_settings[direction]), **overrides}

    # ------------------------------------------------------------------ the call
    def forward(self, f: FixedPointMap, z0: Tensor, *, mode: Optional[str] = None, train_step: Optional[int] = None,
                f_thres: Optional[int] = None, b_thres: Optional[int] = None, solver: Optional[SolverChoice] = None,
                depth: Optional[int] = None, eps: Optional[float] = None, jac_loss: bool = False,
                sample_exit: Optional[SampleExit] = None) -> Tuple[Tensor, EquilibriumInfo]:
        """Solve z = f(z) from ``z0``; every keyword holds for this call only.

        Args:
            f: (B, D) -> (B, D), block-diagonal over the batch; the same function (weights, dropout
                masks) for the whole call, as the backward applies it again.
            z0: (B, D) the start (the solvers work in its dtype, at least float32 is advised).
            mode: ``'equilibrium'`` (default): the forward solver's equilibrium, with the configured
                backward when autograd is on; ``'unrolled'``: ``depth`` applications of f from z0.
            train_step: instead of ``mode``, the warm-up rule (see :meth:`resolve_mode`).
            f_thres, b_thres: the budgets (default: the layer's); equilibrium mode only.
            solver: this call's solver, forward and backward, by name or callable, or a pair.
            depth: the unrolled depth (default: the layer's); unrolled mode only.
            eps: the stopping tolerance of both solves (``0``: run the full budgets).
            jac_loss: with autograd on, ``info.jac_loss`` = the Hutchinson estimate of ||J_f||_F^2
                at the one differentiable application of f the backward builds anyway (the last
                one when unrolled, the one at z* otherwise).
            sample_exit: per-sample exit of the forward solve (:class:`~mdeq.solvers.SampleExit`):
                samples that stop leave it; without autograd, in equilibrium mode, with a solver that
                takes it (L-Broyden, Anderson, plain iteration), else a ValueError.

        Returns:
            ``(z, info)``: (B, D) ``f(z*)`` (or the last unrolled iterate) and the call's :class:`EquilibriumInfo`.
        """
        mode = self.resolve_mode(mode, train_step)
        want_jac = bool(jac_loss) and torch.is_grad_enabled()
        if sample_exit is not None and (mode != "equilibrium" or torch.is_grad_enabled()):
            raise ValueError(f"sample_exit: samples leave the forward solve in evaluation only (under "
                             f"torch.no_grad(), mode 'equilibrium'), not with autograd on or mode {mode!r}")
        if mode == "unrolled":
            return self._unrolled(f, z0, self.depth if depth is None else int(depth), want_jac)
        return self._solved(f, z0, self.f_thres if f_thres is None else int(f_thres),
                            self.b_thres if b_thres is None else int(b_thres), solver, eps, want_jac, sample_exit)

    def _jac_recorder(self, info: EquilibriumInfo) -> Callable[[Tensor, Tensor], None]:
        def record(z_in: Tensor, z_out: Tensor) -> None:
            info.jac_loss = hutchinson_jac_loss(z_in, z_out, self.jac_probes)
        return record

    def _unrolled(self, f: FixedPointMap, z0: Tensor, depth: int, want_jac: bool) -> Tuple[Tensor, EquilibriumInfo]:
        """(B, D) after ``depth`` applications of f from z0, with autograd (the warm-up)."""
        if depth < 1:
            raise ValueError(f"unrolled depth = {depth} must be >= 1")
        info = EquilibriumInfo(mode="unrolled", f_steps=depth)
        z = z0
        for k in range(depth):
            last = k == depth - 1
            # the regulariser's VJP needs the last input in the graph; a fresh leaf leaves z0 as it was
            z_in = z.detach().requires_grad_(True) if (want_jac and last and not z.requires_grad) else z
            z = f(z_in)
            if want_jac and last:
                self._jac_recorder(info)(z_in, z)
        return z, info

    def _solved(self, f: FixedPointMap, z0: Tensor, f_thres: int, b_thres: int, solver: Optional[SolverChoice],
                eps: Optional[float], want_jac: bool, sample_exit: Optional[SampleExit] = None
                ) -> Tuple[Tensor, EquilibriumInfo]:
        """(B, D) the forward solver's equilibrium; with autograd on, connected to the graph by the
        configured backward (:meth:`_differentiable_output`)."""
        f_solver, b_solver = self.call_solvers(solver)
        tol = {} if eps is None else {"eps": eps}
        forward_only = {} if sample_exit is None else {"sample_exit": sample_exit}
        if self.grad == "reversible" and torch.is_grad_enabled():
            return self._reversible(f, z0, f_solver, f_thres, tol, want_jac)
        # the solvers' own linear algebra runs without autocast; f keeps whatever it chooses
        with torch.no_grad(), torch.autocast(z0.device.type, enabled=False):
            result = f_solver(f, z0, f_thres, **self.solver_kwargs("f", f_solver, **tol, **forward_only))
        info = EquilibriumInfo.from_forward(result)
        if result.diverged:
            logger.warning("forward solver diverged for some samples (rel residual %.3g after %d steps)",
                           result.rel_residual, result.steps)
        if torch.is_grad_enabled():
            return self._differentiable_output(f, result.z, b_solver, b_thres, info, want_jac, tol), info
        if self.spectral_radius_iters > 0 and not self.training:
            info.spectral_radius = float(spectral_radius(f, result.z, self.spectral_radius_iters).mean())
        # the reversible backward's output is z_N itself: evaluation returns what training learnt on
        return (result.z if self.grad == "reversible" else result.fz), info

    def _reversible(self, f: FixedPointMap, z0: Tensor, f_solver: SolverFn, f_thres: int, tol: Dict[str, float],
                    want_jac: bool) -> Tuple[Tensor, EquilibriumInfo]:
        """(B, D) z_N of the reversible solver's coupled steps, with the reversible backward (exact
        through those steps; it fills ``b_steps`` and ``b_rev_error`` in); the Jacobian term, when
        asked for, at one more differentiable application of f at z_N."""
        self._check_reversible(f_solver)
        options = self.solver_kwargs("f", f_solver, **tol)
        if torch.is_autocast_enabled(z0.device.type) and options.get("float64_states") is False:
            # f rounds its inputs to half precision, so a rounding difference of a rebuilt state flips
            # roundings and the backward's states drift within a few steps; in float64 they give f the
            # forward's float32 inputs again (docs/reversible.md, "Under autocast")
            options["float64_states"] = True
            if not self._autocast_f64_said:
                logger.info("reversible solver under autocast: its states are kept in float64 "
                            "(MODEL.REV_FLOAT64_STATES), so that the backward rebuilds the forward's states")
                self._autocast_f64_said = True
        with torch.autocast(z0.device.type, enabled=False):
            result, reads = solve_reversible(f_solver, f, z0, f_thres, **options)
        info = EquilibriumInfo.from_forward(result)
        if result.diverged:
            logger.warning("reversible solver: non-finite states after %d steps", result.steps)
        if want_jac:
            z_leaf = result.z.detach().requires_grad_(True)
            self._jac_recorder(info)(z_leaf, f(z_leaf))
        beta = result.beta

        def on_backward(steps: int, error: float) -> None:
            info.record_reversible(steps, error)
            self.drift_warning(steps, beta, error)

        return attach_reversible_backward(f, z0, result, reads, on_backward=on_backward), info

    def _differentiable_output(self, f: FixedPointMap, z_star: Tensor, b_solver: SolverFn, b_thres: int,
                               info: EquilibriumInfo, want_jac: bool, tol: Dict[str, float]) -> Tensor:
        """(B, D) output with autograd for the equilibrium ``z_star``: f(z*) with the implicit backward,
        or the phantom / JFB iterate; the Jacobian term is taken at the application of f at z*."""
        record = self._jac_recorder(info) if want_jac else None
        if self.grad == "implicit":
            return attach_implicit_backward(f, z_star, b_solver, b_thres, on_backward=info.record_backward,
                                            on_application=record, **self.solver_kwargs("b", b_solver, **tol))
        steps, tau = (1, 1.0) if self.grad == "jfb" else (self.phantom_steps, self.phantom_tau)
        info.b_steps = steps  # the applications of f the backward differentiates through
        return attach_phantom_backward(f, z_star, steps, tau, on_application=record)


def _is_reversible(solver: SolverFn) -> bool:
    """Whether ``solver`` is the reversible solver (or a wrapper that sets ``__wrapped__`` to it)."""
    return inspect.unwrap(solver) is inspect.unwrap(reversible)
