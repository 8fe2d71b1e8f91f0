"""Anderson acceleration (type II) for z = f(z), batched per sample.

With the last n <= m iterates x_i and their images f_i = f(x_i), residuals G = F - X, the next
iterate mixes the images with weights alpha that minimise ||G^T alpha|| subject to sum(alpha) = 1
(Tikhonov-regularised by ``lam``):

    x_next = beta * F^T alpha + (1 - beta) * X^T alpha.
"""
from __future__ import annotations

import torch

from .residuals import FixedPointFn, IterateTracker, SolverResult


@torch.no_grad()
def anderson(f: FixedPointFn, z0: torch.Tensor, threshold: int, eps: float = 1e-3, stop_mode: str = "rel",
             memory: int = 5, beta: float = 1.0, lam: float = 1e-4, **_unused) -> SolverResult:
    """Solve ``z = f(z)`` from ``z0`` (B, D) with at most ``threshold`` evaluations of f."""
    bsz, dim = z0.shape
    m = max(2, int(memory))
    xs = z0.new_zeros(bsz, m, dim)
    fs = z0.new_zeros(bsz, m, dim)
    tracker = IterateTracker(z0, eps, stop_mode)
    # the bordered system [[0, 1^T], [1, G G^T + lam I]] [b; alpha] = [1; 0]
    hmat = z0.new_zeros(bsz, m + 1, m + 1)
    hmat[:, 0, 1:] = hmat[:, 1:, 0] = 1
    rhs = z0.new_zeros(bsz, m + 1, 1)
    rhs[:, 0] = 1
    eye = torch.eye(m, dtype=z0.dtype, device=z0.device)

    x = z0
    steps = 0
    while steps < threshold:
        fx = f(x)
        slot = steps % m
        xs[:, slot], fs[:, slot] = x, fx
        steps += 1
        if not tracker.update(x, fx) or steps >= threshold:
            break
        n = min(steps, m)
        if n == 1:
            x_next = beta * fx + (1 - beta) * x
        else:
            g = fs[:, :n] - xs[:, :n]
            h = hmat[:, : n + 1, : n + 1].clone()
            h[:, 1:, 1:] = torch.bmm(g, g.transpose(1, 2)) + lam * eye[:n, :n]
            alpha = torch.linalg.solve(h, rhs[:, : n + 1])[:, 1:, 0]      # (B, n)
            mixed_f = torch.bmm(alpha.unsqueeze(1), fs[:, :n]).squeeze(1)
            mixed_x = torch.bmm(alpha.unsqueeze(1), xs[:, :n]).squeeze(1)
            x_next = beta * mixed_f + (1 - beta) * mixed_x
            x_next = torch.where(torch.isfinite(x_next).all(dim=1, keepdim=True), x_next, fx)
        x = torch.where(tracker.active[:, None], x_next, tracker.restore_diverged(x))
    return tracker.result(steps)
