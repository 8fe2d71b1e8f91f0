"""Plain fixed-point iteration z <- f(z): the baseline the paper compares Broyden against."""
from __future__ import annotations

from typing import Optional

import torch

from .residuals import FixedPointFn, IterateTracker, SampleExit, SolverResult


@torch.no_grad()
def fixed_point(f: FixedPointFn, z0: torch.Tensor, threshold: int, eps: float = 1e-3,
                stop_mode: str = "rel", sample_exit: Optional[SampleExit] = None) -> SolverResult:
    """Iterate ``z <- f(z)`` from ``z0`` (B, D) for at most ``threshold`` evaluations of f.

    ``eps``, ``stop_mode`` and ``sample_exit`` as for :func:`~mdeq.solvers.broyden.broyden`; it takes
    no other option (an unknown keyword is a TypeError naming it).
    """
    tracker = IterateTracker(z0, eps, stop_mode, sample_exit=sample_exit)
    z = z0
    steps = 0
    while steps < threshold:
        fz = f(z)
        steps += 1
        if not tracker.update(z, fz):
            break
        if tracker.keep is not None:      # samples left the solve: go on with the others alone
            z, fz = tracker.select(z, fz)
            f = sample_exit.restrict(tracker.rows)
        if tracker.all_active:
            z = fz
        else:  # stopped samples stay where they are, diverged ones go back to their best iterate
            z = torch.where(tracker.active[:, None], fz, tracker.restore_diverged(z))
    return tracker.result(steps)
