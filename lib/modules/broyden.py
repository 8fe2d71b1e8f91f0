"""Limited-memory Broyden's method for z = f(z) (the forward and backward solver of the MDEQ paper).

We look for a root of g(z) = f(z) - z. Broyden's "good" update of the Jacobian approximation B
of g, started from B0 = -I and built from the last m steps s_i = z_{i+1} - z_i and residual changes
y_i = g_{i+1} - g_i, has the compact form (Byrd, Nocedal & Schnabel, 1994)

    B = -I + (Y + S) N^{-1} S^T,        N = triu(S^T S)  (upper triangle with the diagonal),

with S, Y the (D x n) matrices of the pairs in chronological order. By Woodbury its inverse is

    H = B^{-1} = -I - (Y + S) M^{-1} S^T,        M = N - S^T (Y + S)   (n x n),

and the step is z <- z - H g. Keeping exactly the last m pairs in this form is a true
limited-memory method: dropping the oldest pair leaves the Broyden matrix of the remaining ones,
unlike dropping the oldest rank-one term of the product form, which breaks it.

Everything is batched per sample: each sample has its own matrices, stops when it converges or
diverges, and keeps its lowest-residual iterate. S and U = Y + S live in preallocated (B, m, D)
buffers and S^T S, S^T U in (B, m, m) ones, so memory is O(m D) whatever the number of steps, and a
step costs O(m D) plus an m x m solve.
"""
from __future__ import annotations

from typing import List

import torch

from .residuals import FixedPointFn, IterateTracker, SolverResult


class _CompactBroyden:
    """The inverse Broyden matrix H of the last ``memory`` (s, y) pairs, per sample."""

    def __init__(self, like: torch.Tensor, memory: int) -> None:
        bsz, dim = like.shape
        self.memory = memory
        self.s = like.new_zeros(bsz, memory, dim)
        self.u = like.new_zeros(bsz, memory, dim)         # y + s
        self.sts = like.new_zeros(bsz, memory, memory)     # S^T S, slot order
        self.stu = like.new_zeros(bsz, memory, memory)     # S^T U, slot order
        self.order: List[int] = []                          # slots, oldest first

    def push(self, s: torch.Tensor, y: torch.Tensor) -> None:
        """Add the pair (s, y) (B, D), replacing the oldest when full."""
        slot = len(self.order) if len(self.order) < self.memory else self.order.pop(0)
        self.order.append(slot)
        filled = len(self.order)                      # slots 0 .. filled-1 are in use
        s_buf, u_buf = self.s[:, :filled], self.u[:, :filled]
        s_buf[:, slot] = s
        u_buf[:, slot] = y + s
        s_all = torch.bmm(s_buf, s.unsqueeze(2)).squeeze(2)                       # s_i . s
        self.sts[:, slot, :filled] = s_all
        self.sts[:, :filled, slot] = s_all
        self.stu[:, slot, :filled] = torch.bmm(u_buf, s.unsqueeze(2)).squeeze(2)    # s . u_i
        self.stu[:, :filled, slot] = torch.bmm(s_buf, u_buf[:, slot].unsqueeze(2)).squeeze(2)  # s_i . u

    def newton_step(self, g: torch.Tensor) -> torch.Tensor:
        """-H g (B, D): the quasi-Newton step for the residual g."""
        filled = len(self.order)
        if not filled:
            return g.clone()
        idx = torch.tensor(self.order, device=g.device)
        sts = self.sts[:, :filled, :filled].index_select(1, idx).index_select(2, idx)
        stu = self.stu[:, :filled, :filled].index_select(1, idx).index_select(2, idx)
        # pairs never filled for a frozen sample have zero rows and columns
        # in M; a unit diagonal there removes them from the system without touching the rest
        empty = torch.diagonal(sts, dim1=1, dim2=2) <= 0
        m_mat = torch.triu(sts) - stu + torch.diag_embed(empty.to(sts.dtype))   # (B, n, n), chronological
        s_g = torch.bmm(self.s[:, :filled], g.unsqueeze(2)).squeeze(2)           # (B, n), slot order
        coef, info = torch.linalg.solve_ex(m_mat, s_g.index_select(1, idx).unsqueeze(2))
        coef = torch.where((info == 0)[:, None, None] & torch.isfinite(coef), coef, torch.zeros_like(coef))
        in_slots = torch.empty_like(s_g)
        in_slots[:, idx] = coef.squeeze(2)
        return g + torch.bmm(in_slots.unsqueeze(1), self.u[:, :filled]).squeeze(1)   # g + U M^{-1} S^T g


@torch.no_grad()
def broyden(f: FixedPointFn, z0: torch.Tensor, threshold: int, eps: float = 1e-3, stop_mode: str = "rel",
            memory: int = 12, restart: float = 10.0, **_unused) -> SolverResult:
    """Solve ``z = f(z)`` from ``z0`` (B, D) with at most ``threshold`` evaluations of f.

    Args:
        f: maps (B, D) -> (B, D); evaluated on the whole batch each step.
        threshold: the largest number of f evaluations (T_f or T_b in the paper).
        eps: tolerance on the per-sample residual (see ``stop_mode``).
        stop_mode: ``'rel'`` (||g||/||f(z)||) or ``'abs'`` (||g||).
        memory: the number m of (s, y) pairs kept (Table 4: 12 or 18). The buffers hold m pairs
            whatever the threshold, so memory does not depend on it; ``memory <= 0`` keeps every
            pair (m = threshold), as the original implementation does.
        restart: a sample whose residual grows past ``restart`` times its best continues from its
            best iterate (the pairs are kept: they are valid secant information).
    """
    memory = int(memory) if memory > 0 else int(threshold)
    hmat = _CompactBroyden(z0, max(1, memory))
    tracker = IterateTracker(z0, eps, stop_mode)
    z = z0
    fz = f(z)
    gz = fz - z
    steps = 1
    if not tracker.update(z, fz):
        return tracker.result(steps)
    step = gz.clone()  # -H g with H = -I: the first step is a plain fixed-point step
    while steps < threshold:
        z_new = z + torch.where(tracker.active[:, None], step, torch.zeros_like(step))
        fz_new = f(z_new)
        gz_new = fz_new - z_new
        steps += 1
        keep_going = tracker.update(z_new, fz_new)
        if not keep_going or steps >= threshold:
            break
        active = tracker.active[:, None]
        hmat.push(torch.where(active, z_new - z, torch.zeros_like(z)),
                  torch.where(active, gz_new - gz, torch.zeros_like(z)))
        lost = tracker.active & (tracker.last_res > restart * tracker.best_res)
        lost = lost[:, None] | tracker.diverged[:, None]
        z = torch.where(lost, tracker.best_z, z_new)
        gz = torch.where(lost, tracker.best_fz - tracker.best_z, gz_new)
        step = hmat.newton_step(gz)
    return tracker.result(steps)
