"""Wall-clock timing on the CPU and CUDA: medians of repeated runs, and a solver wrapper that
splits a solve's time into time inside f and the solver's own."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ...solvers.residuals import SolverResult

Tensor = torch.Tensor


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels on CUDA (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], Any], repeats: int, device: torch.device | str, warmup: int = 1) -> float:
    """Median wall time (s) of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class TimedSolver:
    """Wraps a solver to split its wall time into time inside ``f`` and time in the solver itself.

    On CUDA each f call is bracketed by synchronisations, which serialises the solver's own
    kernels with f's; this measures, it does not change what is computed.
    """

    def __init__(self, solver: Callable[..., SolverResult], device: torch.device | str) -> None:
        self.solver, self.device = solver, device
        self.__wrapped__ = solver      # the model passes the wrapped solver's own options (see solver_options)
        self.reset()

    def reset(self) -> None:
        self.total = 0.0
        self.in_f = 0.0
        self.calls = 0

    def __call__(self, f: Callable[[Tensor], Tensor], z0: Tensor, threshold: int, **kwargs) -> SolverResult:
        def timed_f(z: Tensor) -> Tensor:
            synchronize(self.device)
            start = time.perf_counter()
            out = f(z)
            synchronize(self.device)
            self.in_f += time.perf_counter() - start
            self.calls += 1
            return out

        synchronize(self.device)
        start = time.perf_counter()
        result = self.solver(timed_f, z0, threshold, **kwargs)
        synchronize(self.device)
        self.total += time.perf_counter() - start
        return result
