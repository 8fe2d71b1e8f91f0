"""Wall-clock timing on the CPU and CUDA: medians of repeated runs, a solver wrapper that splits a
solve's time into time inside f and the solver's own, and the device's memory read rate."""
from __future__ import annotations

import inspect
import statistics
import time
from typing import Any, Callable

import torch

from ...solvers.registry import history_reads
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


#: the buffer the memory read rate is measured on: larger than the last-level cache of a CPU or GPU
READ_RATE_BYTES = 512 * 2 ** 20


def read_rate(device: torch.device | str, repeats: int = 5, nbytes: int = READ_RATE_BYTES) -> float:
    """Bytes per second that a streaming read (a sum, with the threads set) of ``nbytes`` reaches on
    ``device``: the best rate at which a solver can read its history, which f's working set pushes out
    of the caches between two steps."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    return nbytes / median_time(lambda: buf.sum(), repeats, device)


class TimedSolver:
    """Wraps a solver to split its wall time into time inside ``f`` and time in the solver itself,
    and to count the bytes of history its solves must read at the least (:attr:`history_bytes`, from
    :func:`mdeq.solvers.history_reads` at the steps each solve made).

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
        self.history_bytes = 0

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
        memory = kwargs["memory"] if "memory" in kwargs else _default(self.solver, "memory")
        rows = history_reads(self.solver, result.steps, memory)
        self.history_bytes += rows * z0.numel() * z0.element_size()
        return result


def _default(fn: Callable[..., Any], name: str) -> Any:
    """The default of ``fn``'s keyword ``name`` (0 where it has none)."""
    param = inspect.signature(fn).parameters.get(name)
    return 0 if param is None or param.default is param.empty else param.default
