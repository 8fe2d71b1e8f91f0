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
ring buffers and S^T S, S^T U in (B, m, m) ones, so memory is O(m D) whatever the number of steps.

Cost per step, besides the one evaluation of f: the (B, n, D) history is read three times (one
batched product of S with [s, u, g], one of U with s, one of U with the m x m solution), plus a
few O(D) vector operations and an n x n solve. The pairs stay in slot order: a system permuted
alike on rows and columns has the permuted solution, so the chronological upper triangle of N is
taken with a mask from each slot's insertion rank instead of reordering the matrices. Nothing here
waits for the device except the one stopping test per step in :class:`IterateTracker.update`.
"""
from __future__ import annotations

import torch

from .residuals import FixedPointFn, IterateTracker, SolverResult

Tensor = torch.Tensor


class _CompactBroyden:
    """The inverse Broyden matrix H of the last ``memory`` (s, y) pairs, per sample.

    Args:
        like: (B, D) a tensor with the batch size, dimension, dtype and device of the states.
        memory: m, the number of pairs kept (the ring buffers hold exactly m).
    """

    def __init__(self, like: Tensor, memory: int) -> None:
        bsz, dim = like.shape
        self.memory = memory
        # only filled slots are ever read, so the (B, m, D) buffers need no zeroing
        self.s = like.new_empty(bsz, memory, dim)
        self.u = like.new_empty(bsz, memory, dim)          # y + s
        self.sts = like.new_zeros(bsz, memory, memory)      # S^T S, slot order
        self.stu = like.new_zeros(bsz, memory, memory)      # S^T U, slot order: stu[i, j] = s_i . u_j
        self.rank = torch.zeros(memory, dtype=torch.long, device=like.device)  # insertion count per slot
        self.filled = 0
        self.pushed = 0

    def next_slot(self) -> tuple:
        """Take the slot of the next pair (the oldest when full); returns its (B, D) views into S
        and U, for the caller to write s and u = y + s into (no copies)."""
        slot = self.pushed % self.memory
        self.pushed += 1
        self.filled = min(self.pushed, self.memory)
        self.rank[slot] = self.pushed        # a scalar fill: no transfer, no wait
        self.slot = slot
        return self.s[:, slot], self.u[:, slot]

    def update(self, g: Tensor) -> Tensor:
        """Fold in the pair just written to :meth:`next_slot`'s views and return the quasi-Newton
        step ``-H g`` (B, D) for the residual ``g`` (B, D) of the next iterate."""
        slot, n = self.slot, self.filled
        s_buf, u_buf = self.s[:, :n], self.u[:, :n]
        s, u = self.s[:, slot].unsqueeze(1), self.u[:, slot].unsqueeze(1)          # (B, 1, D) views
        # rows times (history)^T: batched GEMMs, which CPU BLAS runs several times faster than the
        # batched matrix-vector form (history) x (column)
        s_s = torch.bmm(s, s_buf.transpose(1, 2)).squeeze(1)                          # (B, n): s . s_i
        self.sts[:, slot, :n] = s_s
        self.sts[:, :n, slot] = s_s
        self.stu[:, :n, slot] = torch.bmm(u, s_buf.transpose(1, 2)).squeeze(1)        # s_i . u
        self.stu[:, slot, :n] = torch.bmm(s, u_buf.transpose(1, 2)).squeeze(1)        # s . u_i
        s_g = torch.bmm(g.unsqueeze(1), s_buf.transpose(1, 2)).transpose(1, 2)        # (B, n, 1)

        sts, stu = self.sts[:, :n, :n], self.stu[:, :n, :n]
        rank = self.rank[:n]
        older_or_same = rank[:, None] <= rank[None, :]           # chronological upper triangle
        # a pair pushed as zeros (a frozen sample) has a zero row and column in M; a unit
        # diagonal there removes it from the system without touching the rest
        empty = torch.diagonal(sts, dim1=1, dim2=2) <= 0
        m_mat = torch.where(older_or_same, sts, 0.0) - stu + torch.diag_embed(empty.to(sts.dtype))
        coef, info = torch.linalg.solve_ex(m_mat, s_g)                                  # (B, n, 1)
        coef = torch.where((info == 0)[:, None, None] & torch.isfinite(coef), coef, 0.0)
        return torch.baddbmm(g.unsqueeze(1), coef.transpose(1, 2), u_buf).squeeze(1)  # g + U M^{-1} S^T g


@torch.no_grad()
def broyden(f: FixedPointFn, z0: Tensor, threshold: int, eps: float = 1e-3, stop_mode: str = "rel",
            memory: int = 12, restart: float = 10.0, **_unused) -> SolverResult:
    """Solve ``z = f(z)`` from ``z0`` (B, D) with at most ``threshold`` evaluations of f.

    Args:
        f: maps (B, D) -> (B, D); evaluated on the whole batch each step.
        z0: (B, D) the starting point.
        threshold: the largest number of f evaluations (T_f or T_b in the paper).
        eps: tolerance on the per-sample residual (see ``stop_mode``).
        stop_mode: ``'rel'`` (||g||/||f(z)||) or ``'abs'`` (||g||).
        memory: the number m of (s, y) pairs kept (Table 4: 12 or 18). The buffers hold m pairs
            whatever the threshold, so memory does not depend on it; ``memory <= 0`` keeps every
            pair (m = threshold), as the original implementation does.
        restart: a sample whose residual grows past ``restart`` times its best continues from its
            best iterate (the pairs are kept: they are valid secant information).

    Returns:
        :class:`SolverResult` with the lowest-residual iterate of each sample.
    """
    memory = int(memory) if memory > 0 else int(threshold)
    hmat = _CompactBroyden(z0, max(1, memory))
    tracker = IterateTracker(z0, eps, stop_mode, restart=restart)
    z = z0
    fz = f(z)
    steps = 1
    if not tracker.update(z, fz):
        return tracker.result(steps)
    step = tracker.last_g.clone()  # -H g with H = -I: the first step is a plain fixed-point step
    while steps < threshold:
        z_new = z + step                              # step is zero for samples that stopped
        fz_new = f(z_new)
        steps += 1
        if not tracker.update(z_new, fz_new) or steps >= threshold:
            break
        s_slot, u_slot = hmat.next_slot()
        torch.sub(z_new, z, out=s_slot)
        torch.sub(fz_new, fz, out=u_slot)             # y + s = (g_new - g) + (z_new - z)
        # samples that stopped push zero pairs (removed from their system, see _CompactBroyden)
        inactive = ~tracker.active[:, None]
        s_slot.masked_fill_(inactive, 0.0)
        u_slot.masked_fill_(inactive, 0.0)
        if tracker.any_lost:                          # a host flag from the one stopping test
            lost = tracker.lost[:, None]
            z = torch.where(lost, tracker.best_z, z_new)
            fz = torch.where(lost, tracker.best_fz, fz_new)
            g = fz - z
        else:
            z, fz, g = z_new, fz_new, tracker.last_g
        step = hmat.update(g)
        step.masked_fill_(inactive, 0.0)
    return tracker.result(steps)
