"""A whole benchmark run: the parts asked for (:data:`PARTS`), in order, as one JSON-able dict."""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional, Sequence

import torch

from ...config import ConfigError
from .backward_modes import run_backward_modes
from .measurements import forward_solve, overheads, time_components, train_step
from .memory import peak_memory
from .reversible import run_reversible
from .spec import BenchSpec, build
from .timing import read_rate

logger = logging.getLogger(__name__)


#: the parts of a run, in the order they run (``components`` runs whenever ``train`` does: the
#: overhead figures divide by its times; ``backward`` is a training step per MODEL.GRAD mode; ``reversible``
#: the reversible backward's gradient drift and memory, not run unless asked for)
PARTS = ("components", "forward", "train", "unrolled", "memory", "backward", "reversible")
#: the parts a run makes when none are named
DEFAULT_PARTS = PARTS[:-1]


def run_benchmark(spec: BenchSpec, f_thres: Optional[int], b_thres: Optional[int], solvers: Sequence[str],
                  repeats: int, mem_thres: Sequence[int] = (10, 40), parts: Sequence[str] = DEFAULT_PARTS) -> Dict[str, Any]:
    """The measurements of the benchmark named in ``parts`` (see :data:`PARTS`); returns a JSON-able
    dict (see :func:`format_report`)."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:  # a ConfigError: the tool reports it in one line, exit status 2
        raise ConfigError(f"--parts: unknown benchmark part(s) {unknown}; choose from {','.join(PARTS)}")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    start = time.perf_counter()
    model, x, y = build(spec)
    f_thres = model.f_thres if f_thres is None else f_thres
    b_thres = model.b_thres if b_thres is None else b_thres
    out: Dict[str, Any] = {"spec": spec.__dict__, "f_thres": f_thres, "b_thres": b_thres,
                           "device_name": _device_name(x.device), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "compile": bool(model.compiled), "parts": list(parts)}
    if "components" in parts or "train" in parts or "unrolled" in parts:
        logger.info("timing the components")
        out["components"] = time_components(model, x, y, repeats)
    if "forward" in parts or "train" in parts:
        logger.info("timing the memory read rate")
        out["read_rate"] = read_rate(x.device, repeats)
    if "forward" in parts:
        logger.info("forward solves at %d evaluations", f_thres)
        out["forward"] = {s: forward_solve(model, x, s, f_thres, repeats) for s in solvers}
        for fw in out["forward"].values():    # the least time beside f, s
            fw["history_floor"] = fw["history_bytes"] / out["read_rate"]
    if "train" in parts:
        out["train"] = {}
        for s in solvers:
            logger.info("training step with %s", s)
            st = train_step(model, x, y, f_thres, b_thres, repeats, solver=s)
            st.update(overheads(st, out["components"], out["read_rate"]))
            out["train"][s] = st
    if "unrolled" in parts:
        logger.info("unrolled training step at depth %d", f_thres)
        out["unrolled"] = train_step(model, x, y, f_thres, b_thres, repeats, unrolled_depth=f_thres)
    if "memory" in parts:
        out["memory"] = []
        for thres in mem_thres:
            for depth in (0, thres):
                logger.info("peak memory at threshold %d (%s)", thres, "unrolled" if depth else "implicit")
                m = peak_memory(spec, thres, thres, unrolled_depth=depth)
                m.update({"thres": thres, "mode": "unrolled" if depth else "implicit"})
                out["memory"].append(m)
    if "backward" in parts:
        out["backward_modes"] = run_backward_modes(spec, f_thres, b_thres, repeats)
    if "reversible" in parts:
        out["reversible"] = run_reversible(spec)
    out["wall_s"] = time.perf_counter() - start
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU {platform.processor() or platform.machine()}"
