"""The timed pieces of a training step and the overhead figures.

The physical limit of an implicit training step is the work it cannot avoid: ``T_f`` forward
evaluations of f, ``T_b`` vector-Jacobian products of the adjoint solve, one differentiable
application of f with its backward, and the stem and head. Everything else is solver overhead.
Five figures are reported:

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
* ``history floor``: the least time a solver with this history must spend beside f, over the limit:
  the bytes of history its steps must read (:func:`mdeq.solvers.history_reads`) at the device's
  memory read rate (:func:`~.timing.read_rate`). No implementation of the same method and memory
  gets ``vs limit`` below it; the forward table gives it over the solve's time in f.

``t_f`` and ``t_vjp`` in the first three are the mean times of f and of the adjoint step as they ran
inside the measured training steps (the solvers are wrapped), not the separate component timings:
on a shared machine those drift by 10-20 % against the steps, and the figures with them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

from ...modules import weights_fixed
from ...solvers.residuals import SolverResult
from .timing import TimedSolver, median_time

Tensor = torch.Tensor


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

    Returns time (s), steps, relative and absolute residual reached, the time inside f and the
    solver's own, and the bytes of history the solve must read at the least (``history_bytes``).
    """
    device = x.device
    model.eval()
    from ...solvers import get_solver
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
            "in_f": timed.in_f / max(1, repeats), "solver": (timed.total - timed.in_f) / max(1, repeats),
            "history_bytes": timed.history_bytes / max(1, repeats)}


def train_step(model, x: Tensor, y: Tensor, f_thres: int, b_thres: int, repeats: int,
               solver: Optional[str] = None, unrolled_depth: int = 0) -> Dict[str, Any]:
    """A full training step (forward solve, head, loss, backward with the implicit backward solve).

    With ``unrolled_depth > 0``: the warm-up mode instead, ``unrolled_depth`` weight-tied layers
    differentiated by backprop. ``solver`` (if given) is used forward and backward.
    Returns the median time (s), the solver statistics of the last step, the time spent inside
    the solvers but outside f (``solver_own``, s per step) and the bytes of history its two solves
    must read at the least (``history_bytes``, per step).
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
    out = {"time": t, "stats": stats, "solver_own": own,
           "history_bytes": (f_timer.history_bytes + b_timer.history_bytes) / max(1, repeats)}
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


def overheads(step: Dict[str, Any], comp: Dict[str, float], rate: Optional[float] = None) -> Dict[str, float]:
    """The overhead figures (see the module docstring) for a training step ``step``; the history floor
    only with the memory read ``rate`` (bytes/s)."""
    s = step["stats"]
    # f and the VJP timed inside the measured steps: the same conditions as the step (a separate
    # timing on a shared machine drifts by 10-20 % against it, which moved the figures as much)
    t_f, t_vjp = step.get("t_f_step", comp["f"]), step.get("t_b_step", comp["vjp"])
    fs, bs = s.get("f_steps", 0), s.get("b_steps", 0)
    budget = (fs + bs + 2) * t_f
    limit = fs * t_f + bs * t_vjp + comp["f_graph_bwd"] + comp["stem_head"]
    # floor: the headline figure of a solver that costs nothing itself (the limit over the budget)
    out = {"overhead": step["time"] / budget - 1, "floor": limit / budget - 1, "limit": limit,
           "vs_limit": step["time"] / limit - 1, "in_solver": step["solver_own"] / step["time"]}
    if rate:
        out["history_floor"] = step["history_bytes"] / rate / limit
    return out
