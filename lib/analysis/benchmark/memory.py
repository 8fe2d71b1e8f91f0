"""Peak memory of one training step: CUDA's ``max_memory_allocated`` or, on the CPU, the growth of
the peak resident set size during the step, measured in a fresh process per setting so that the
peaks are comparable; and the size of the solver's history, the part that grows with the threshold."""
from __future__ import annotations

import multiprocessing
import resource
import sys
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F

from .measurements import _step_call
from .spec import BenchSpec, build
from .timing import synchronize


def _current_rss_kb() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        import os
        return pages * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError, IndexError):
        return None


def _peak_kb() -> int:
    """Peak RSS of this process image (KiB). Linux: VmHWM, which :func:`_reset_peak` can lower;
    ``ru_maxrss`` would also count the peak of the process that spawned this one (Linux carries it
    over exec), which hides a worker's own peak under a large parent."""
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak // 1024 if sys.platform == "darwin" else peak   # bytes on macOS, KiB on Linux


def _reset_peak() -> None:
    """Lower the peak RSS to the current RSS where Linux allows it (``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _peak_start(device: torch.device) -> int:
    """Reset the peak counter; the bytes in use now (the baseline of :func:`_peak_total`)."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    _reset_peak()
    return (_current_rss_kb() or _peak_kb()) * 1024


def _peak_total(device: torch.device) -> int:
    """The peak bytes since :func:`_peak_start` (CUDA: allocated; CPU: resident)."""
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _peak_kb() * 1024


def peak_memory_worker(spec: BenchSpec, f_thres: int, b_thres: int, unrolled_depth: int) -> Dict[str, Any]:
    """Peak memory (MiB) of one training step; run it in a fresh process on the CPU.

    CUDA: ``max_memory_allocated`` during the step minus what was allocated before it. CPU: the
    peak RSS after the step minus the RSS before it (the process first runs a small no-grad
    solve, so kernels and thread pools exist before the measured step).
    """
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, x, y = build(spec)
    device = x.device
    model.train()
    # tolerance 0: every setting runs its full thresholds
    call = _step_call(f_thres, b_thres, unrolled_depth, eps=0.0)
    with torch.no_grad():
        model(x, mode="equilibrium", f_thres=2)
    before = _peak_start(device)
    logits, info = model(x, return_info=True, **call)
    F.cross_entropy(logits, y).backward()
    total = _peak_total(device)
    peak = total - before
    stats = info.stats()
    history = 0.0
    if not unrolled_depth:
        with torch.no_grad():
            dim = model.equilibrium_problem(model.injection(x)).z0.shape[1]
        history = solver_history_bytes(model, x.shape[0], dim, max(f_thres, b_thres), x.element_size()) / 2 ** 20
    return {"step_peak_mib": peak / 2 ** 20, "process_peak_mib": total / 2 ** 20, "history_mib": history,
            "stats": stats}


def solver_history_bytes(model, batch: int, dim: int, thres: int, itemsize: int = 4) -> int:
    """Bytes of the largest solver history buffer of a training step (forward and backward solves
    run one after the other, so one buffer is alive at a time): it grows with the threshold up to
    the solver memory m, and is the only part of an implicit step that depends on the thresholds."""
    from ...solvers import history_rows
    memory = int(model.solver_settings["f"]["memory"])
    rows = max(history_rows(solver, thres, memory) for solver in (model.f_solver, model.b_solver))
    return rows * batch * dim * itemsize


def peak_memory(spec: BenchSpec, f_thres: int, b_thres: int, unrolled_depth: int = 0) -> Dict[str, Any]:
    """:func:`peak_memory_worker` in a fresh (spawned) process on the CPU, so that every setting starts
    alike; in this process on CUDA, whose peak counter (``max_memory_allocated``) is exact and can be
    reset, and where a fresh process would cost seconds of start-up per row."""
    if torch.device(spec.device).type == "cuda":
        return peak_memory_worker(spec, f_thres, b_thres, unrolled_depth)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(peak_memory_worker, (spec, f_thres, b_thres, unrolled_depth))
