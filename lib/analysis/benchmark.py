"""Solver speed against the physical limit: f-evaluation time, solves, training steps, peak memory.

The physical limit of an implicit training step is the work it cannot avoid: ``T_f`` forward
evaluations of f, ``T_b`` vector-Jacobian products of the adjoint solve, one differentiable
application of f with its backward, and the stem and head. Everything else is solver overhead.
Four figures are reported:

* ``overhead`` (the project's headline figure): ``t_step / ((T_f + T_b + 2) * t_f) - 1``. It
  counts a VJP as one f evaluation and the stem/head as free, so it also contains
  ``T_b * (t_vjp - t_f)`` and the head; the measured ratio ``t_vjp / t_f`` is printed with it.
* ``vs limit``: ``t_step / (T_f t_f + T_b t_vjp + t_f,graph+bwd + t_stem+head) - 1`` with every
  term measured separately.
* ``floor``: the same limit over the headline figure's budget, ``limit / ((T_f + T_b + 2) t_f) - 1``:
  the headline overhead of a solver that cost nothing itself, i.e. the lowest any solver can score
  on this model and machine.
* ``in solver``: wall time spent inside the solvers but outside f (and outside the VJPs), as a
  share of the step: the part the solver code controls, measured directly by wrapping the solver.

``t_f`` and ``t_vjp`` in the first three are the mean times of f and of the adjoint step as they ran
inside the measured training steps (the solvers are wrapped), not the separate component timings:
on a shared machine those drift by 10-20 % against the steps, and the figures with them.

Peak memory is CUDA's ``max_memory_allocated`` or, on the CPU, the growth of the peak resident set
size during one step, measured in a fresh process per setting so that the peaks are comparable.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..config import ConfigError, load_config
from ..models import get_cls_net
from ..modules import weights_fixed
from ..solvers.residuals import SolverResult
from ..utils.checkpoint import load_weights
from .sample_images import tool_batch

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------- setup
@dataclass
class BenchSpec:
    """What to benchmark: one config and batch on one device (picklable, for the memory worker)."""

    cfg: str
    opts: List[Any] = field(default_factory=list)
    batch_size: int = 32
    image_size: int = 32
    test_model: str = ""
    images: str = ""          # a recorded batch (see sample_images.recorded_batch); default: photo crops
    device: str = "cpu"
    threads: int = 0          # torch.set_num_threads in workers (0: leave as is)
    seed: int = 0


def build(spec: BenchSpec) -> Tuple[torch.nn.Module, Tensor, Tensor]:
    """The classification model of ``spec`` (weights from ``test_model`` if given) on its device,
    a batch of real images x (N, 3, S, S) (``spec.images``, or crops of photographs) and labels y (N,)."""
    cfg = load_config(spec.cfg, list(spec.opts))
    torch.manual_seed(spec.seed)
    model = get_cls_net(cfg)
    if spec.test_model:
        load_weights(model, spec.test_model)
    device = torch.device(spec.device)
    model.to(device)
    x = tool_batch(spec.images, spec.batch_size, spec.image_size, cfg, spec.seed).to(device)
    y = (torch.arange(spec.batch_size) % cfg.MODEL.NUM_CLASSES).to(device)
    return model, x, y


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


# ------------------------------------------------------------------------------ measurements
def time_components(model, x: Tensor, y: Tensor, repeats: int) -> Dict[str, float]:
    """Times (s) of the pieces a training step cannot avoid, at a realistic state.

    Returns ``f`` (one no-grad evaluation of f, (B, D) -> (B, D)), ``vjp`` (one J^T w through the
    retained graph of f, as in the adjoint solve), ``f_graph_bwd`` (f with autograd plus its full
    backward to the parameters and the injection) and ``stem_head`` (stem and head, forward and
    backward).
    """
    device = x.device
    repeats = max(5, repeats)        # cheap pieces: more repeats, the overhead figures divide by them
    model.train()
    inj = model.injection(x).detach()
    problem = model.equilibrium_problem(inj)
    with torch.no_grad(), weights_fixed(model.fullstage):    # as inside a model call: w computed once
        z = problem.z0
        for _ in range(5):                       # a state of realistic scale
            z = problem.f(z)
        t_f = median_time(lambda: problem.f(z), repeats, device, warmup=2)
    z_leaf = z.detach().requires_grad_()
    out = problem.f(z_leaf)
    w = torch.randn_like(out)
    t_vjp = median_time(lambda: torch.autograd.grad(out, z_leaf, w, retain_graph=True), repeats, device)

    def f_graph_bwd() -> None:
        inj_leaf = inj.detach().requires_grad_()
        prob = model.equilibrium_problem(inj_leaf)
        zl = z.detach().requires_grad_()
        prob.f(zl).backward(w)

    t_fgb = median_time(f_graph_bwd, repeats, device)

    def stem_head() -> None:
        inj_x = model.injection(x)
        states = [s.detach().requires_grad_() for s in problem.unflatten(z)]
        loss = F.cross_entropy(model.head(states), y)
        loss.backward()
        inj_x.backward(torch.ones_like(inj_x))

    t_sh = median_time(stem_head, repeats, device)
    model.zero_grad(set_to_none=True)
    return {"f": t_f, "vjp": t_vjp, "f_graph_bwd": t_fgb, "stem_head": t_sh}


def forward_solve(model, x: Tensor, solver: str, evals: int, repeats: int) -> Dict[str, float]:
    """An eval-mode forward solve with exactly ``evals`` evaluations of f (tolerance 0).

    Returns time (s), steps, relative and absolute residual reached, and the time inside f.
    """
    device = x.device
    model.eval()
    from ..solvers import get_solver
    timed = TimedSolver(get_solver(solver), device)
    kwargs = model.solver_kwargs("f", timed, eps=0.0)
    with torch.no_grad(), weights_fixed(model.fullstage):
        inj = model.injection(x)
        problem = model.equilibrium_problem(inj)
        result_box: List[SolverResult] = []

        def solve() -> None:
            result_box[:] = [timed(problem.f, problem.z0, evals, **kwargs)]

        solve()
        timed.reset()
        t = median_time(solve, repeats, device, warmup=0)
    res = result_box[0]
    return {"time": t, "steps": res.steps, "rel": res.rel_residual, "abs": res.abs_residual,
            "in_f": timed.in_f / max(1, repeats), "solver": (timed.total - timed.in_f) / max(1, repeats)}


def train_step(model, x: Tensor, y: Tensor, f_thres: int, b_thres: int, repeats: int,
               solver: Optional[str] = None, unrolled_depth: int = 0) -> Dict[str, Any]:
    """A full training step (forward solve, head, loss, backward with the implicit backward solve).

    With ``unrolled_depth > 0``: the warm-up mode instead, ``unrolled_depth`` weight-tied layers
    differentiated by backprop. ``solver`` (if given) is used forward and backward.
    Returns the median time (s), the solver statistics of the last step and the time spent inside
    the solvers but outside f (``solver_own``, s per step).
    """
    device = x.device
    model.train()
    f_timer, b_timer = (TimedSolver(s, device) for s in model.call_solvers(solver))
    call = _step_call(f_thres, b_thres, unrolled_depth, solver=(f_timer, b_timer))
    infos = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        logits, info = model(x, return_info=True, **call)
        F.cross_entropy(logits, y).backward()
        infos[:] = [info]

    step()
    f_timer.reset(), b_timer.reset()
    t = median_time(step, repeats, device, warmup=0)
    stats = infos[0].stats()
    own = (f_timer.total - f_timer.in_f + b_timer.total - b_timer.in_f) / max(1, repeats)
    model.zero_grad(set_to_none=True)
    out = {"time": t, "stats": stats, "solver_own": own}
    if f_timer.calls:       # f and the adjoint step as they ran inside these very steps
        out["t_f_step"] = f_timer.in_f / f_timer.calls
    if b_timer.calls:
        out["t_b_step"] = b_timer.in_f / b_timer.calls
    return out


def _step_call(f_thres: int, b_thres: int, unrolled_depth: int, **extra: Any) -> Dict[str, Any]:
    """The keywords of a benchmarked model call: unrolled at ``unrolled_depth`` if it is > 0, else
    the equilibrium at these thresholds (``extra``: e.g. the solvers of the call)."""
    if unrolled_depth:
        return {"mode": "unrolled", "depth": unrolled_depth}
    return {"mode": "equilibrium", "f_thres": f_thres, "b_thres": b_thres, **extra}


def overheads(step: Dict[str, Any], comp: Dict[str, float]) -> Dict[str, float]:
    """The overhead figures (see the module docstring) for a training step ``step``."""
    s = step["stats"]
    # f and the VJP timed inside the measured steps: the same conditions as the step (a separate
    # timing on a shared machine drifts by 10-20 % against it, which moved the figures as much)
    t_f, t_vjp = step.get("t_f_step", comp["f"]), step.get("t_b_step", comp["vjp"])
    fs, bs = s.get("f_steps", 0), s.get("b_steps", 0)
    budget = (fs + bs + 2) * t_f
    limit = fs * t_f + bs * t_vjp + comp["f_graph_bwd"] + comp["stem_head"]
    # floor: the headline figure of a solver that costs nothing itself (the limit over the budget)
    return {"overhead": step["time"] / budget - 1, "floor": limit / budget - 1, "limit": limit,
            "vs_limit": step["time"] / limit - 1, "in_solver": step["solver_own"] / step["time"]}


# ------------------------------------------------------------------------------ peak memory
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
    from ..solvers import anderson, broyden
    from ..solvers.anderson import history_size
    from ..solvers.broyden import history_rows
    memory = int(model.solver_settings["f"]["memory"])
    rows = 0
    for solver in (model.f_solver, model.b_solver):
        if solver is broyden:
            rows = max(rows, history_rows(thres, memory))
        elif solver is anderson:
            rows = max(rows, 2 * history_size(thres, memory))
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


# ------------------------------------------------------------------------------ backward modes
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


# ------------------------------------------------------------------------------ the whole run
#: the parts of a run, in the order they run (``components`` runs whenever ``train`` does: the
#: overhead figures divide by its times; ``backward`` is a training step per MODEL.GRAD mode)
PARTS = ("components", "forward", "train", "unrolled", "memory", "backward")


def run_benchmark(spec: BenchSpec, f_thres: Optional[int], b_thres: Optional[int], solvers: Sequence[str],
                  repeats: int, mem_thres: Sequence[int] = (10, 40), parts: Sequence[str] = PARTS) -> Dict[str, Any]:
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
    if "forward" in parts:
        logger.info("forward solves at %d evaluations", f_thres)
        out["forward"] = {s: forward_solve(model, x, s, f_thres, repeats) for s in solvers}
    if "train" in parts:
        out["train"] = {}
        for s in solvers:
            logger.info("training step with %s", s)
            st = train_step(model, x, y, f_thres, b_thres, repeats, solver=s)
            st.update(overheads(st, out["components"]))
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
    out["wall_s"] = time.perf_counter() - start
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU {platform.processor() or platform.machine()}"


def _ms(t: float) -> str:
    return f"{1e3 * t:.1f}"


def _header_and_components(r: Dict[str, Any]) -> List[str]:
    spec = r["spec"]
    lines = [f"**{Path(spec['cfg']).name}**, batch {spec['batch_size']}, {spec['image_size']}x{spec['image_size']}, "
             f"{spec['device']} ({r['device_name']}, {r['threads']} threads), torch {r['torch']}, "
             f"weights: {Path(spec['test_model']).name if spec['test_model'] else 'random init'}, "
             f"images: {Path(spec['images']).name if spec.get('images') else 'photo crops'}, "
             f"T_f={r['f_thres']}, T_b={r['b_thres']}, MODEL.COMPILE {r.get('compile', False)}", ""]
    comp = r.get("components")
    if comp:
        lines += ["| component | time (ms) |", "|---|---:|",
                  f"| one f evaluation (no grad) | {_ms(comp['f'])} |",
                  f"| one VJP J^T w (adjoint step) | {_ms(comp['vjp'])} (VJP/f = {comp['vjp'] / comp['f']:.2f}) |",
                  f"| f with autograd + its backward | {_ms(comp['f_graph_bwd'])} |",
                  f"| stem + head, forward + backward | {_ms(comp['stem_head'])} |", ""]
    return lines


def _forward_table(r: Dict[str, Any]) -> List[str]:
    lines = [f"Forward solve (eval mode), exactly {r['f_thres']} f evaluations each (tolerance 0):", "",
             "| solver | rel. residual | abs. residual | time (ms) | ms / eval | solver's own time |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, fw in r["forward"].items():
        lines.append(f"| {name} | {fw['rel']:.2e} | {fw['abs']:.2e} | {_ms(fw['time'])} | "
                     f"{_ms(fw['time'] / max(1, fw['steps']))} | {100 * fw['solver'] / fw['time']:.1f}% |")
    return lines + [""]


def _train_table(r: Dict[str, Any]) -> List[str]:
    lines = ["Training step (forward solve + head + loss + implicit backward; same solver forward and backward):",
             "", "| solver | step (ms) | T_f used | T_b used | f / VJP in step (ms) | f rel | b rel | overhead "
             "| floor | vs limit | in solver |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, st in r.get("train", {}).items():
        s = st["stats"]
        in_step = (f"{_ms(st['t_f_step'])} / {_ms(st['t_b_step'])}" if "t_f_step" in st and "t_b_step" in st
                   else "-")
        lines.append(f"| {name} | {_ms(st['time'])} | {s.get('f_steps')} | {s.get('b_steps')} | {in_step} | "
                     f"{s.get('f_rel', float('nan')):.1e} | {s.get('b_rel', float('nan')):.1e} | "
                     f"{100 * st['overhead']:.1f}% | {100 * st['floor']:.1f}% | {100 * st['vs_limit']:.1f}% | "
                     f"{100 * st['in_solver']:.1f}% |")
    if "unrolled" in r:
        un, t_f = r["unrolled"], r["components"]["f"]
        lines.append(f"| unrolled warm-up, depth {r['f_thres']} (backprop) | {_ms(un['time'])} | {r['f_thres']} | - "
                     f"| - | - | - | {100 * (un['time'] / ((2 * r['f_thres']) * t_f) - 1):.1f}%* | - | - | - |")
    return lines + ["", "overhead = step / ((T_f + T_b + 2) x t_f) - 1; vs limit = step / (T_f t_f + T_b t_vjp + "
                    "t_f,graph+bwd + t_stem+head) - 1, with t_f and t_vjp timed inside the steps; floor = that limit / "
                    "((T_f + T_b + 2) x t_f) - 1, the overhead of a solver that cost nothing itself; in solver = time "
                    "inside the solvers outside f / step. *unrolled: step / (2 x depth x t_f) - 1, t_f from the "
                    "component table.", ""]


def _memory_table(r: Dict[str, Any]) -> List[str]:
    where = ("CUDA max_memory_allocated, in this process" if r["spec"]["device"].startswith("cuda")
             else "peak RSS, fresh process per row")
    lines = [f"Peak memory of one training step ({where}); the solver history (L-Broyden: "
             "2 min(m + 1, T) + 1 rows of B x D) is the only part of an implicit step that depends on T:", "",
             "| mode | T_f = T_b (or depth) | steps used f / b | step peak (MiB) | solver history (MiB) "
             "| step peak - history (MiB) | process peak (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in r["memory"]:
        s = m["stats"]
        used = f"{s.get('f_steps')} / {s.get('b_steps', '-')}"
        hist = m.get("history_mib", 0.0)
        lines.append(f"| {m['mode']} | {m['thres']} | {used} | {m['step_peak_mib']:.0f} | {hist:.0f} | "
                     f"{m['step_peak_mib'] - hist:.0f} | {m['process_peak_mib']:.0f} |")
    return lines


def format_report(r: Dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_benchmark` result (the tables of the parts it ran)."""
    lines = _header_and_components(r)
    if "forward" in r:
        lines += _forward_table(r)
    if "train" in r or "unrolled" in r:
        lines += _train_table(r)
    if "memory" in r:
        lines += _memory_table(r)
    if r.get("backward_modes"):
        lines.append(format_backward_modes(r["backward_modes"], r["f_thres"]))
    if "wall_s" in r:
        lines.append(f"({r['wall_s']:.0f} s wall.)")
    return "\n".join(lines)


def dump_json(r: Dict[str, Any], path: str | Path) -> None:
    """Write a :func:`run_benchmark` result as JSON."""
    Path(path).write_text(json.dumps(r, indent=1, default=str))
