"""The reversible backward (MODEL.GRAD reversible) measured: its gradient against autograd through the
same coupled steps stored in full, the reconstruction drift of its rebuilt states, and the peak memory
of a training step against the stored steps and the unrolled stack (``tools/benchmark.py --parts
reversible``)."""
from __future__ import annotations

import logging
import multiprocessing
from dataclasses import replace
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...modules import coupled_steps, weights_fixed
from ...utils.cpu_allocator import retain_freed_memory
from .memory import _peak_start, _peak_total
from .spec import BenchSpec, build

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

#: what the accuracy table runs: dtypes (the last: float32 f, float64 states), betas and numbers of coupled steps
REV_DTYPES = ("float64", "float32", "float32+f64 states")
REV_BETAS = (0.5, 0.8, 1.2)
REV_STEPS = (2, 4, 8, 16, 32)
#: the memory table's numbers of coupled steps, and the ways of backpropagating through them
REV_MEM_STEPS = (4, 32)
REV_MEM_MODES = ("reversible", "stored", "unrolled")


def _reversible_spec(spec: BenchSpec, beta: float, float64_states: bool = False) -> BenchSpec:
    """``spec`` with the reversible solver and backward at ``beta``, every step run (tolerance 0)."""
    return replace(spec, opts=list(spec.opts) + ["MODEL.F_SOLVER", "reversible", "MODEL.GRAD", "reversible",
                                                 "MODEL.REV_BETA", beta, "MODEL.F_EPS", 0.0,
                                                 "MODEL.REV_FLOAT64_STATES", bool(float64_states)])


def _stored_logits(model, x: Tensor, steps: int, beta: float) -> Tensor:
    """The model's logits with its equilibrium replaced by ``steps`` coupled steps recorded by autograd."""
    with weights_fixed(model.fullstage):
        problem = model.equilibrium_problem(model.injection(x))
        z = coupled_steps(problem.f, problem.z0, steps, beta, model.solver_settings["f"]["float64_states"])
    return model.head(problem.unflatten(z))


def _flat_grads(loss: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """d loss / d tensors, flattened and concatenated (zeros where a tensor gets none)."""
    grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).flatten() for t, g in zip(tensors, grads)])


def gradient_drift(model, x: Tensor, y: Tensor, steps: int, beta: float) -> Dict[str, float]:
    """One batch: the relative error of the reversible gradient of every parameter and of the input
    images (through the injection) against that of the same steps stored by autograd, the backward's
    reconstruction error and the forward's final residual. ``model`` has the reversible solver at ``beta``."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    xr, xs = x.detach().requires_grad_(True), x.detach().requires_grad_(True)
    logits, info = model(xr, return_info=True, f_thres=steps)
    g_rev = _flat_grads(F.cross_entropy(logits, y), params + [xr])
    g_ref = _flat_grads(F.cross_entropy(_stored_logits(model, xs, steps, beta), y), params + [xs])
    return {"grad_rel_error": float((g_rev - g_ref).double().norm() / g_ref.double().norm()),
            "rev_error": float(info.b_rev_error), "f_rel": float(info.f_rel)}


def gradient_drift_table(spec: BenchSpec, dtypes: Sequence[str] = REV_DTYPES, betas: Sequence[float] = REV_BETAS,
                         steps: Sequence[int] = REV_STEPS) -> List[Dict[str, Any]]:
    """:func:`gradient_drift` of ``spec``'s model and batch for every dtype, beta and number of steps (one
    row each, in this process; the model is built afresh per dtype and beta, its weights as ``spec`` says)."""
    rows = []
    for dtype in dtypes:
        torch_dtype = getattr(torch, dtype.split("+")[0])
        for beta in betas:
            model, x, y = build(_reversible_spec(spec, beta, float64_states="f64 states" in dtype))
            model.to(torch_dtype)
            for n in steps:
                logger.info("reversible gradient, %s, beta %g, %d steps", dtype, beta, n)
                row = gradient_drift(model, x.to(torch_dtype), y, n, beta)
                rows.append({"dtype": dtype, "beta": beta, "steps": n, **row})
    return rows


def reversible_memory_worker(spec: BenchSpec, mode: str, steps: int, beta: float) -> Dict[str, Any]:
    """Peak memory (MiB; CPU: RSS growth, CUDA: allocated) of one training step whose equilibrium is
    ``steps`` coupled steps backpropagated by ``mode``: ``'reversible'`` (MODEL.GRAD reversible),
    ``'stored'`` (the same steps recorded by autograd) or ``'unrolled'`` (the warm-up's stack, depth
    2 x steps: as many evaluations of f). Run it in a fresh process on the CPU."""
    retain_freed_memory()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, x, y = build(_reversible_spec(spec, beta))
    model.train()
    with torch.no_grad():
        model(x, f_thres=2)
    before = _peak_start(x.device)
    if mode == "reversible":
        logits = model(x, f_thres=steps)
    elif mode == "stored":
        logits = _stored_logits(model, x, steps, beta)
    elif mode == "unrolled":
        logits = model(x, mode="unrolled", depth=2 * steps)
    else:
        raise ValueError(f"reversible memory mode {mode!r}; choose one of {REV_MEM_MODES}")
    F.cross_entropy(logits, y).backward()
    return {"mode": mode, "steps": steps, "beta": beta, "step_peak_mib": (_peak_total(x.device) - before) / 2 ** 20}


def reversible_memory(spec: BenchSpec, beta: float = 0.8, steps: Sequence[int] = REV_MEM_STEPS,
                      modes: Sequence[str] = REV_MEM_MODES) -> List[Dict[str, Any]]:
    """:func:`reversible_memory_worker` for every mode and number of steps, each in a fresh process."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for n in steps:
        for mode in modes:
            logger.info("peak memory, %s, %d coupled steps", mode, n)
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(reversible_memory_worker, (spec, mode, n, beta)))
    return rows


def _pivot(drift: Sequence[Dict[str, Any]], key: str, title: str) -> List[str]:
    """A markdown table of ``key`` with a row per (dtype, beta) and a column per number of steps."""
    rows: Dict[Tuple[str, float], Dict[int, float]] = {}
    for r in drift:
        rows.setdefault((r["dtype"], r["beta"]), {})[r["steps"]] = r[key]
    steps = sorted({r["steps"] for r in drift})
    lines = ["", f"{title}:", "", "| states | beta | " + " | ".join(f"N={n}" for n in steps) + " |",
             "|---|---:|" + "---:|" * len(steps)]
    return lines + [f"| {dtype} | {beta:g} | " + " | ".join(f"{v[n]:.1e}" if n in v else "-" for n in steps) + " |"
                    for (dtype, beta), v in rows.items()]


def format_reversible(result: Dict[str, Any]) -> str:
    """The markdown tables of the ``reversible`` part (gradient drift, peak memory); empty without it."""
    drift, memory = result.get("drift") or [], result.get("memory") or []
    lines: List[str] = []
    if drift:
        lines += ["", "Reversible backward against autograd through the same N coupled steps stored in full (one "
                  "training batch; states: float64, float32, or float32 f with float64 states)."]
        lines += _pivot(drift, "grad_rel_error", "Relative error of the gradient (every parameter and the input images)")
        lines += _pivot(drift, "rev_error", "Reconstruction error of the rebuilt start, max(|y_0' - z0|, |z_0' - z0|) "
                                            "/ max(|z0|, |z_N|)")
        lines += _pivot(drift, "f_rel", "The forward's final relative residual |f(z_N) - z_N| / |f(z_N)|")
    if memory:
        lines += ["", "Peak memory of a training step (fresh process per row), N coupled steps backpropagated: "
                  "reversible, stored (the same steps recorded by autograd), unrolled (the warm-up's stack at depth "
                  "2N, as many evaluations of f):", "", "| N | mode | step peak (MiB) |", "|---:|---|---:|"]
        lines += [f"| {r['steps']} | {r['mode']} | {r['step_peak_mib']:.1f} |" for r in memory]
    return "\n".join(lines)


def run_reversible(spec: BenchSpec) -> Dict[str, Any]:
    """The ``reversible`` part of a benchmark run: :func:`gradient_drift_table` and :func:`reversible_memory`."""
    return {"drift": gradient_drift_table(spec), "memory": reversible_memory(spec)}
