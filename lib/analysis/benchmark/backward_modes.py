"""The backward-mode study: one training-step row per MODEL.GRAD mode (and Jacobian regularisation):
time, evaluations of f, VJPs, peak memory, and its table."""
from __future__ import annotations

import logging
import multiprocessing
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from .measurements import _step_call
from ...utils.cpu_allocator import retain_freed_memory
from .memory import _peak_start, _peak_total
from .spec import BenchSpec, build
from .timing import TimedSolver, median_time

logger = logging.getLogger(__name__)


# MODEL.GRAD and Jacobian regularisation: one training-step row per mode (time, f evaluations, VJPs,
# peak memory), each mode in a fresh process at equal thresholds and tolerance 0.
BACKWARD_MODES: Dict[str, Tuple[List[str], bool]] = {
    "implicit": (["MODEL.GRAD", "implicit"], False),
    "implicit + JR": (["MODEL.GRAD", "implicit"], True),
    "phantom": (["MODEL.GRAD", "phantom"], False),
    "jfb": (["MODEL.GRAD", "jfb"], False),
}


def backward_mode_worker(spec: BenchSpec, mode: str, f_thres: int, b_thres: int, repeats: int) -> Dict[str, Any]:
    """Peak memory (first step), median time and evaluation counts of a training step in ``mode``.

    Counts: ``f_nograd`` (forward solver), ``f_graph`` (applications of f recorded for backprop),
    ``vjp`` (adjoint-solver steps, each one VJP through the graph of f). Memory as
    :func:`peak_memory_worker` (CUDA: allocated bytes; CPU: RSS).
    """
    from dataclasses import replace
    # a spawned process starts with glibc's default thresholds: set them as the training tools do, or
    # the step's page faults make every mode look slower than it trains (the peak RSS stays the same)
    retain_freed_memory()
    opts, jac = BACKWARD_MODES[mode]
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, x, y = build(replace(spec, opts=list(spec.opts) + opts))
    device = x.device
    model.train()
    calls = {True: 0, False: 0}
    model.fullstage.register_forward_hook(lambda m, i, o: calls.__setitem__(torch.is_grad_enabled(),
                                                                            calls[torch.is_grad_enabled()] + 1))
    b_timer = TimedSolver(model.b_solver, device)
    call = _step_call(f_thres, b_thres, 0, solver=(model.f_solver, b_timer), eps=0.0, jac_loss=jac)

    infos = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits, info = model(x, return_info=True, **call)
        loss = F.cross_entropy(logits, y)
        if info.jac_loss is not None:
            loss = loss + info.jac_loss
        loss.backward()
        infos[:] = [info]

    with torch.no_grad():
        model(x, f_thres=2)
    before = _peak_start(device)
    calls[True] = calls[False] = 0
    b_timer.reset()
    step()
    peak = _peak_total(device) - before
    counts = {"f_nograd": calls[False], "f_graph": calls[True], "vjp": b_timer.calls}
    t = median_time(step, repeats, device, warmup=0)
    stats = infos[0].stats()
    return {"mode": mode, "time": t, "step_peak_mib": peak / 2 ** 20, "stats": stats, **counts}


def run_backward_modes(spec: BenchSpec, f_thres: int, b_thres: int, repeats: int) -> List[Dict[str, Any]]:
    """:func:`backward_mode_worker` for every mode of :data:`BACKWARD_MODES`, each in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for mode in BACKWARD_MODES:
        logger.info("training step, backward mode %s", mode)
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(backward_mode_worker, (spec, mode, f_thres, b_thres, repeats)))
    return rows


def format_backward_modes(rows: Sequence[Dict[str, Any]], f_thres: int) -> str:
    """The markdown table of :func:`run_backward_modes` (empty without rows)."""
    if not rows:
        return ""
    lines = ["", f"Training step per backward mode (MODEL.GRAD; JR = Jacobian regularisation), T_f = {f_thres}, "
             "tolerance 0, fresh process per row; f counts the applications of f in the forward solve (no grad) "
             "and those recorded for backprop, VJP the adjoint-solver steps:", "",
             "| mode | step (ms) | f (no grad) | f (graph) | VJP (adjoint) | jac_loss | step peak (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        jac = r["stats"].get("jac_loss")
        lines.append(f"| {r['mode']} | {1e3 * r['time']:.1f} | {r['f_nograd']} | {r['f_graph']} | {r['vjp']} | "
                     f"{'-' if jac is None else f'{jac:.3g}'} | {r['step_peak_mib']:.1f} |")
    return "\n".join(lines)
