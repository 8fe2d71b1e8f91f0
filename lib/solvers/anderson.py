"""Anderson acceleration (type II) for z = f(z), batched per sample.

With the last n <= m iterates x_i, their images f_i = f(x_i) and residuals g_i = f_i - x_i, the
next iterate mixes the images with weights alpha that minimise ||G^T alpha|| subject to
sum(alpha) = 1 (Tikhonov-regularised by ``lam``):

    [[0, 1^T], [1, G G^T + lam I]] [b; alpha] = [1; 0],
    x_next = beta * F^T alpha + (1 - beta) * X^T alpha = F^T alpha - (1 - beta) G^T alpha.

Implementation: F and G live in (B, m, D) ring buffers (strided views of one (2m, B, D) buffer that a
:class:`~mdeq.solvers.workspace.SolverWorkspace` lends from call to call: fresh pages would cost a
fault per 4 KiB on first touch) and the Gram matrix G G^T in a (B, m, m) one that is updated by one row
per step (G g_new, a single pass over G), so a step costs two passes over the history (three when
beta != 1) and an (n+1) x (n+1) solve, not the O(n^2 D) of forming G G^T afresh. The residual is
written straight into its G slot, and a sample whose system is singular gets the weights of its newest
image (no (B, D) test or selection). Samples that converged or diverged are frozen by a per-sample
mask; the weights do not depend on the order of the slots, so no reordering is needed.
"""
from __future__ import annotations

from typing import Optional

import torch

from .residuals import FixedPointFn, IterateTracker, SampleExit, SolverResult, solver_memory
from .workspace import SolverWorkspace, take

Tensor = torch.Tensor


def history_size(threshold: int, memory: int) -> int:
    """m, the past iterates a solve keeps: ``memory`` (``<= 0``: ``threshold``), between 2 and
    ``threshold``. The history holds 2 (B, D) rows (f_i and g_i) per iterate."""
    return max(2, min(solver_memory(memory, threshold), int(threshold)))


def history_rows(threshold: int, memory: int) -> int:
    """(B, D) rows of the history buffers of a solve: F and G, one row each per kept iterate."""
    return 2 * history_size(threshold, memory)


def history_reads(threshold: int, memory: int) -> int:
    """The (B, D) history rows that a solve of ``threshold`` evaluations must read, at the least, over
    all its steps. The step after k evaluations mixes n = min(k, m) iterates: the new Gram row reads
    the n residuals and the mixture the n images (2n rows; with beta != 1 this implementation reads G
    once more). A step with n = 1 reads nothing: it is the plain step. At the device's memory read rate
    this is the time no Anderson solve with this memory can go below."""
    m = history_size(threshold, memory)
    return sum(2 * min(k, m) for k in range(2, int(threshold)))     # mixing steps 2 .. T - 1


@torch.no_grad()
def anderson(f: FixedPointFn, z0: Tensor, threshold: int, eps: float = 1e-3, stop_mode: str = "rel",
             memory: int = 5, beta: float = 1.0, lam: float = 1e-4, workspace: Optional[SolverWorkspace] = None,
             sample_exit: Optional[SampleExit] = None) -> SolverResult:
    """Solve ``z = f(z)`` from ``z0`` (B, D) with at most ``threshold`` evaluations of f.

    Args:
        f: maps (B, D) -> (B, D).
        z0: (B, D) the starting point.
        threshold: the largest number of f evaluations.
        eps: tolerance on the per-sample residual (see ``stop_mode``).
        stop_mode: ``'rel'`` or ``'abs'``.
        memory: m, the number of past iterates mixed (at least 2, at most ``threshold``; ``<= 0``:
            m = threshold). The history holds 2 (B, D) rows per iterate.
        beta: the mixing (damping) parameter; 1 mixes the images f_i only.
        lam: Tikhonov regularisation of the Gram matrix G G^T.
        workspace: a :class:`SolverWorkspace` to reuse the history buffer from call to call.
        sample_exit: per-sample exit (:class:`~mdeq.solvers.residuals.SampleExit`): an extra stopping
            rule, and samples that stop leave the solve (the history of the others is kept).

    Returns:
        :class:`SolverResult` with the lowest-residual iterate of each sample.
    """
    m = history_size(threshold, memory)
    buffer = take(workspace, (2 * m, *z0.shape), z0)   # no zeroing: only filled slots are read
    try:
        return _anderson_loop(f, z0, threshold, m, buffer, eps, stop_mode, beta, lam, sample_exit)
    finally:
        if workspace is not None:
            workspace.give(buffer)


def _anderson_loop(f: FixedPointFn, z0: Tensor, threshold: int, m: int, buffer: Tensor, eps: float,
                   stop_mode: str, beta: float, lam: float, sample_exit: Optional[SampleExit]) -> SolverResult:
    bsz = z0.shape[0]
    fs = buffer[:m].transpose(0, 1)        # (B, m, D) images f_i
    gs = buffer[m:2 * m].transpose(0, 1)   # (B, m, D) residuals g_i = f_i - x_i
    gram = z0.new_zeros(bsz, m, m)         # g_i . g_j, slot order
    tracker = IterateTracker(z0, eps, stop_mode, sample_exit=sample_exit)
    # the bordered system, (B, m+1, m+1): row/column 0 carry the constraint sum(alpha) = 1
    border = z0.new_zeros(m + 1, m + 1)
    border[0, 1:] = border[1:, 0] = 1
    border[1:, 1:] = lam * torch.eye(m, dtype=z0.dtype, device=z0.device)
    rhs = z0.new_zeros(bsz, m + 1, 1)
    rhs[:, 0] = 1

    x = z0
    steps = 0
    while steps < threshold:
        fx = f(x)
        slot = steps % m
        steps += 1
        if not tracker.update(x, fx, g_out=gs[:, slot]) or steps >= threshold:
            break
        if tracker.keep is not None:      # samples left the solve: go on with the others alone
            x, fx, fs, gs, gram, rhs = tracker.select(x, fx, fs, gs, gram, rhs)
            f = sample_exit.restrict(tracker.rows)
        x_next = _mix(fs, gs, gram, border, rhs, slot, min(steps, m), fx, beta)
        x = x_next if tracker.all_active else torch.where(tracker.active[:, None], x_next,
                                                              tracker.restore_diverged(x))
    return tracker.result(steps)


def _mix(fs: Tensor, gs: Tensor, gram: Tensor, border: Tensor, rhs: Tensor, slot: int, n: int, fx: Tensor,
         beta: float) -> Tensor:
    """Store f(x) in the history's ``slot`` (whose G row already holds its residual), update the Gram
    matrix by its row, and return the next iterate (B, D), mixing the ``n`` filled slots (for a sample
    whose system is singular, the step of n = 1: f(x) - (1 - beta) g)."""
    fs[:, slot] = fx
    g = gs[:, slot]
    row = torch.bmm(g.unsqueeze(1), gs[:, :n].transpose(1, 2)).squeeze(1)   # (B, n): g_new . g_i
    gram[:, slot, :n] = row
    gram[:, :n, slot] = row
    if n == 1:
        return fx - (1 - beta) * g
    h = border[: n + 1, : n + 1] + torch.nn.functional.pad(gram[:, :n, :n], (1, 0, 1, 0))
    sol, info = torch.linalg.solve_ex(h, rhs[:, : n + 1])
    alpha = sol[:, 1:].transpose(1, 2)                              # (B, 1, n)
    # a singular system: the weights of the newest image alone, which mix to f(x) - (1 - beta) g as
    # with n = 1 (the rows of a sample still in the solve are finite, else it would have diverged)
    ok = (info == 0) & torch.isfinite(alpha).all(dim=2).squeeze(1)
    newest = alpha.new_zeros(1, 1, n)
    newest[..., slot] = 1.0
    alpha = torch.where(ok[:, None, None], alpha, newest)
    x_next = torch.bmm(alpha, fs[:, :n]).squeeze(1)
    if beta != 1:
        x_next = x_next - (1 - beta) * torch.bmm(alpha, gs[:, :n]).squeeze(1)
    return x_next
