"""Our training step against torchdeq's (``pip install torchdeq==0.1.0``) on the same MDEQ f.

Both sides run the model of one :class:`~mdeq.analysis.benchmark.spec.BenchSpec` with the same weights
on the same batch: the stem ``model.injection(x)``, the map ``f`` of ``model.equilibrium_problem(inj)``
on flattened (B, D) states with each weight-normalised ``w`` computed once per step
(:func:`~mdeq.modules.weights_fixed`, as a model call does), the head and the cross-entropy. Only
what lies between differs:

* ours: the model's own training call ``model(x, mode="equilibrium", f_thres=T_f, b_thres=T_b,
  solver=..., eps=0.0)``: the forward solve, one differentiable application of f at z*, and the
  adjoint solve in an autograd hook (:mod:`mdeq.modules.implicit`);
* torchdeq: ``torchdeq.get_deq(core=..., ift=True, ...)`` called on the same ``f``: its solver, then
  its implicit-differentiation function (by default a ``torch.autograd.Function`` that evaluates f
  once more, with autograd, inside the backward and solves the adjoint system from w = 0).

Tolerances are 0 on both sides, so every solve runs its whole budget. The budgets are set so that
the two sides pay the same number of evaluations of f in the forward solve and of vector-Jacobian
products in the adjoint solve (``match_evals``): torchdeq's Broyden evaluates f once before its
first step, so it gets ``T - 1`` iterations (:data:`PEER_EXTRA_EVALS`). Every count is measured, not
assumed: each solver is wrapped to count the calls of its map, and a forward pre-hook on
``model.fullstage`` counts the applications of f made with autograd on. The tables show them.

The solvers' options are matched where torchdeq has them: its Broyden keeps ``LBFGS_thres`` update
columns and its Anderson ``m`` iterates, both set to our ``MODEL.SOLVER_MEMORY`` (at most the budget,
as our history holds no more), Anderson's ``lam`` / ``tau`` to ``MODEL.ANDERSON_LAM`` / ``ANDERSON_BETA``,
the stop mode (which iterate counts as the lowest-residual one) to ``MODEL.STOP_MODE``. torchdeq takes
no solver options for its backward solve, so each direction's solver is registered with torchdeq
(``torchdeq.solver.register_solver``) as its own solver function with these options bound.

:func:`fixed_point_check` shows that the two sides compute the same thing: with plain fixed-point
iteration on both (at a budget where both keep the same iterate, :func:`check_budget`), the outputs
agree bit for bit, and so do the parameter gradients against torchdeq's hook IFT, which takes J at
z* as ours does; its default IFT takes J at f(z*), so its gradients agree only to the forward residual.
"""
from __future__ import annotations

import logging
import platform
import statistics
from importlib import metadata
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import weights_fixed
from ..utils.provenance import cpu_model
from .benchmark.spec import BenchSpec, build
from .benchmark.timing import median_time

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

#: the torchdeq release this comparison was written against (its solvers' evaluation counts below)
TORCHDEQ_VERSION = "0.1.0"
INSTALL_HINT = f"pip install torchdeq=={TORCHDEQ_VERSION}"
#: our solver name -> torchdeq's name of the same method
PEER_SOLVERS = {"broyden": "broyden", "anderson": "anderson", "fixed_point": "fixed_point_iter"}
#: evaluations of its map a torchdeq solver makes beyond ``max_iter``: its Broyden evaluates g(x0)
#: before the first of its ``max_iter`` steps; its Anderson evaluates f twice before its loop over
#: k = 2 .. max_iter - 1, i.e. ``max_iter`` in all; its fixed-point iteration ``max_iter``. Ours make
#: exactly ``threshold``. The adjoint solve counts the same way (its map is one VJP).
PEER_EXTRA_EVALS = {"broyden": 1, "anderson": 0, "fixed_point": 0}
#: torchdeq's DEQ cores (:func:`torchdeq.get_deq`); with one state both run the solver once
CORES = ("sliced", "indexing")


class PeerMissing(RuntimeError):
    """torchdeq is not installed (the message says how to install it)."""


def import_torchdeq() -> ModuleType:
    """The ``torchdeq`` module; a :class:`PeerMissing` saying how to install it if it is absent.

    torchdeq is an optional dependency (not in requirements.txt): only this comparison uses it, so it is
    imported here, not at the top of the module: the rest of the package imports without it.
    """
    try:
        import torchdeq
        return torchdeq
    except ModuleNotFoundError as e:
        raise PeerMissing(f"the peer comparison needs torchdeq, which is not installed: {INSTALL_HINT}") from e


def torchdeq_version() -> str:
    """The installed torchdeq's version (``""`` when it is not installed)."""
    try:
        return metadata.version("torchdeq")
    except metadata.PackageNotFoundError:
        return ""


# ---------------------------------------------------------------------------------------- counting
class CountingSolver:
    """Wraps one of our solvers ``solver(f, z0, threshold, **options)`` and counts the calls of ``f``
    it makes (:attr:`calls`): evaluations of f in a forward solve, VJPs in an adjoint solve.

    ``__wrapped__`` makes the model pass the wrapped solver's own options (see
    :func:`mdeq.solvers.option_names`), as the benchmark's timer does.
    """

    def __init__(self, solver: Callable[..., Any]) -> None:
        self.solver = solver
        self.__wrapped__ = solver
        self.calls = 0

    def __call__(self, f: Callable[[Tensor], Tensor], z0: Tensor, threshold: int, **options: Any) -> Any:
        def counted(z: Tensor) -> Tensor:
            self.calls += 1
            return f(z)
        return self.solver(counted, z0, threshold, **options)


class PeerSolver:
    """A torchdeq solver with our options bound, counting the calls of its map (:attr:`calls`).

    torchdeq calls it as ``solver(func, x0, max_iter=..., tol=..., stop_mode=..., **kwargs)`` in the
    forward solve and as ``solver(vjp_map, zeros, max_iter=..., tol=..., stop_mode=...)`` in the
    backward one, with no way to pass solver options to the latter: binding them here gives both
    directions our history size.
    """

    def __init__(self, solver: Callable[..., Any], **options: Any) -> None:
        self.solver, self.options = solver, options
        self.calls = 0

    def __call__(self, func: Callable[[Tensor], Tensor], x0: Tensor, **kwargs: Any) -> Any:
        def counted(z: Tensor) -> Tensor:
            self.calls += 1
            return func(z)
        return self.solver(counted, x0, **{**kwargs, **self.options})


class ApplicationCounter:
    """Counts the applications of f (calls of ``model.fullstage``) made with autograd on, and those
    without, by a forward pre-hook; a context manager that removes the hook on exit."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.graph = 0
        self.no_grad = 0
        self._handle: Optional[Any] = None

    def _count(self, module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            self.graph += 1
        else:
            self.no_grad += 1

    def __enter__(self) -> "ApplicationCounter":
        self._handle = self.module.register_forward_pre_hook(self._count)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# ---------------------------------------------------------------------------------------- the two sides
def peer_budget(solver: str, threshold: int, match_evals: bool = True) -> int:
    """torchdeq's ``max_iter`` for a solve that evaluates its map ``threshold`` times as ours does
    (``match_evals``), or ``threshold`` itself."""
    if not match_evals:
        return int(threshold)
    budget = int(threshold) - PEER_EXTRA_EVALS[solver]
    floor = 2 if solver == "anderson" else 1    # torchdeq's Anderson evaluates f twice before it checks max_iter
    if budget < floor:
        raise ValueError(f"a threshold of {threshold} is too small to match torchdeq's {solver} "
                         f"({PEER_EXTRA_EVALS[solver]} extra evaluation(s), at least {floor} iteration(s))")
    return budget


def peer_options(model: nn.Module, solver: str, threshold: int, direction: str) -> Dict[str, Any]:
    """torchdeq's options for ``solver`` that match our ``direction`` ('f' or 'b') settings of ``model``.

    History: ours keeps at most ``min(m, threshold)`` pairs / iterates (m = MODEL.SOLVER_MEMORY,
    ``<= 0``: every step), torchdeq preallocates ``LBFGS_thres`` / ``m`` of them whatever ``max_iter``
    is, so it gets that same number: the history a solve can fill, not a larger zeroed buffer.
    """
    settings = model.solver_settings[direction]
    memory = int(settings.get("memory", 0))
    history = min(memory, int(threshold)) if memory > 0 else int(threshold)
    if solver == "broyden":
        return {"LBFGS_thres": max(1, history), "ls": False}    # torchdeq's default: no line search
    if solver == "anderson":
        return {"m": max(2, history), "lam": float(settings.get("lam", 1e-4)),
                "tau": float(settings.get("beta", 1.0))}
    return {}


def build_peer(model: nn.Module, solver: str, f_thres: int, b_thres: int, core: str = "sliced",
               hook_ift: bool = False, match_evals: bool = True, budgets: Optional[Tuple[int, int]] = None
               ) -> Tuple[nn.Module, PeerSolver, PeerSolver]:
    """torchdeq's DEQ for ``solver`` forward and backward, tolerance 0, implicit differentiation, one
    state; and its forward and backward solvers (counting). Its budgets (``max_iter``): ``budgets``
    (forward, backward) if given, else :func:`peer_budget` of ``f_thres`` and ``b_thres``."""
    torchdeq = import_torchdeq()
    if solver not in PEER_SOLVERS:
        raise ValueError(f"no torchdeq counterpart of solver {solver!r}; choose from {sorted(PEER_SOLVERS)}")
    if core not in CORES:
        raise ValueError(f"torchdeq core must be one of {CORES}, got {core!r}")
    base = torchdeq.solver.get_solver(PEER_SOLVERS[solver])
    fwd = PeerSolver(base, **peer_options(model, solver, f_thres, "f"))
    bwd = PeerSolver(base, **peer_options(model, solver, b_thres, "b"))
    # torchdeq looks its solvers up by name when the DEQ is built; these names are ours, overwritten by
    # the next build (a built DEQ keeps the functions it looked up)
    names = {d: f"mdeq-peer-{d}-{solver}" for d in ("f", "b")}
    torchdeq.solver.register_solver(names["f"], fwd)
    torchdeq.solver.register_solver(names["b"], bwd)
    stop_mode = model.solver_settings["f"].get("stop_mode", "rel")
    if budgets is None:
        budgets = (peer_budget(solver, f_thres, match_evals), peer_budget(solver, b_thres, match_evals))
    deq = torchdeq.get_deq(core=core, f_solver=names["f"], b_solver=names["b"],
                           f_max_iter=int(budgets[0]), b_max_iter=int(budgets[1]),
                           f_tol=0.0, b_tol=0.0, f_stop_mode=stop_mode, b_stop_mode=stop_mode,
                           ift=not hook_ift, hook_ift=hook_ift, n_states=1)
    return deq, fwd, bwd


def our_solvers(model: nn.Module, solver: str) -> Tuple[CountingSolver, CountingSolver]:
    """Our (forward, backward) solvers of a call with ``solver``, counting (see ``model.call_solvers``)."""
    f_solver, b_solver = model.call_solvers(solver)
    return CountingSolver(f_solver), CountingSolver(b_solver)


def our_train_step(model: nn.Module, x: Tensor, y: Tensor, f_thres: int, b_thres: int,
                   solvers: Tuple[CountingSolver, CountingSolver], want_states: bool = False
                   ) -> Tuple[Optional[Tensor], Tensor, Any]:
    """One training step by the model's own call (train mode, tolerance 0): zero_grad, forward solve,
    head, cross-entropy, backward with the adjoint solve.

    Args:
        x: (B, C, H, W) images; y: (B,) labels.
        want_states: also return the equilibrium output: the model's forward is exactly
            ``equilibrium_states`` then ``head``, so the step calls those two itself.

    Returns:
        (the equilibrium output flattened (B, D), or None unless ``want_states``; the logits
        (B, classes); the call's EquilibriumInfo).
    """
    model.train()
    model.zero_grad(set_to_none=True)
    call = dict(mode="equilibrium", f_thres=f_thres, b_thres=b_thres, solver=solvers, eps=0.0)
    if want_states:
        states, info = model.equilibrium_states(x, **call)
        logits = model.head(states)
    else:
        logits, info = model(x, return_info=True, **call)
    F.cross_entropy(logits, y).backward()
    return (_flat(states).detach() if want_states else None), logits.detach(), info


def peer_train_step(model: nn.Module, deq: nn.Module, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Any]:
    """One training step through torchdeq's DEQ on our f (train mode), as :func:`our_train_step`.

    Returns:
        (the equilibrium output flattened (B, D), the logits (B, classes), torchdeq's solver info).
    """
    model.train()
    deq.train()
    model.zero_grad(set_to_none=True)
    # w once per step, as inside a model call; f restores these w when torchdeq's backward evaluates it
    # again after the block (see equilibrium_problem)
    with weights_fixed(model.fullstage):
        problem = model.equilibrium_problem(model.injection(x))
        z_out, info = deq(problem.f, problem.z0)
    states = problem.unflatten(z_out[-1])
    logits = model.head(states)
    F.cross_entropy(logits, y).backward()
    return _flat(states).detach(), logits.detach(), info


def _flat(states: Sequence[Tensor]) -> Tensor:
    """Per-resolution states [(B, C_i, H_i, W_i)] -> (B, D), in NCHW order whatever their layout."""
    return torch.cat([s.flatten(1) for s in states], dim=1)


def _our_forward_solve(model: nn.Module, x: Tensor, f_thres: int, solver: CountingSolver) -> Tensor:
    """The forward solve alone (eval mode, no autograd), through the model's equilibrium layer: (B, D)."""
    model.eval()
    with torch.no_grad(), weights_fixed(model.fullstage):
        problem = model.equilibrium_problem(model.injection(x))
        # the layer directly, not the model call: an evaluation call would add TEST.EXIT_* per-sample exits
        z, _ = model.deq(problem.f, problem.z0, mode="equilibrium", f_thres=f_thres, solver=(solver, solver),
                         eps=0.0)
    return z


def _peer_forward_solve(model: nn.Module, deq: nn.Module, x: Tensor) -> Tensor:
    """torchdeq's forward solve alone (eval mode, no autograd): (B, D)."""
    model.eval()
    deq.eval()
    with torch.no_grad(), weights_fixed(model.fullstage):
        problem = model.equilibrium_problem(model.injection(x))
        z_out, _ = deq(problem.f, problem.z0)
    return z_out[-1]


# ---------------------------------------------------------------------------------------- counts and checks
def _counts(app: ApplicationCounter, f_solver: Any, b_solver: Any) -> Dict[str, int]:
    """``f_evals``: the forward solver's evaluations of f; ``f_graph``: applications of f with autograd
    on (ours: the one at z*; torchdeq: that one and its backward's); ``adjoint``: the adjoint solver's
    VJPs; ``f_no_grad``: every application without autograd (equals ``f_evals`` when only the solver
    evaluates f)."""
    return {"f_evals": f_solver.calls, "f_graph": app.graph, "adjoint": b_solver.calls, "f_no_grad": app.no_grad}


def counted_train_steps(model: nn.Module, x: Tensor, y: Tensor, solver: str, f_thres: int, b_thres: int,
                        core: str = "sliced", hook_ift: bool = False, match_evals: bool = True,
                        seed: int = 0) -> Dict[str, Any]:
    """One training step on each side with every evaluation of f counted (see :func:`_counts`).

    Returns ``{"ours": counts, "peer": counts, "peer_budget": [f_max_iter, b_max_iter], "ours_info": ...}``.
    """
    ours = our_solvers(model, solver)
    deq, pf, pb = build_peer(model, solver, f_thres, b_thres, core, hook_ift, match_evals)
    out: Dict[str, Any] = {"peer_budget": [deq.f_max_iter, deq.b_max_iter]}
    torch.manual_seed(seed)
    with ApplicationCounter(model.fullstage) as app:
        _, _, info = our_train_step(model, x, y, f_thres, b_thres, ours)
    out["ours"] = _counts(app, *ours)
    out["ours_info"] = {k: info.stats().get(k) for k in ("f_steps", "b_steps", "f_rel", "b_rel", "b_fallback")}
    torch.manual_seed(seed)
    with ApplicationCounter(model.fullstage) as app:
        peer_train_step(model, deq, x, y)
    out["peer"] = _counts(app, pf, pb)
    model.zero_grad(set_to_none=True)
    return out


def _grads(model: nn.Module) -> Dict[str, Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def forward_residuals(model: nn.Module, x: Tensor, iters: int, seed: int = 0) -> Tensor:
    """(iters, B) the relative residual ||f(z_k) - z_k|| / ||f(z_k)|| of each sample at each plain
    iterate z_k = f^k(z0), k < ``iters``, on the f of a training step seeded with ``seed`` (train mode:
    the same batch statistics and dropout masks as the step's); what both sides' fixed-point
    iterations rank their iterates by. No autograd."""
    model.train()
    torch.manual_seed(seed)
    rows = []
    with torch.no_grad(), weights_fixed(model.fullstage):
        problem = model.equilibrium_problem(model.injection(x))
        z = problem.z0
        for _ in range(iters):
            fz = problem.f(z)
            rows.append((fz - z).float().norm(dim=1) / (fz.float().norm(dim=1) + 1e-30))
            z = fz
    return torch.stack(rows)


def lowest_at_last(residuals: Tensor, iters: int) -> Tensor:
    """(B,) bool: the first ``iters`` rows of ``residuals`` (T, B) are lowest at the last one, per sample
    (the first of equal minima counts, as both sides keep an iterate only when it is strictly better)."""
    return residuals[:iters].argmin(dim=0) == iters - 1


def same_iterate(residuals: Tensor, iters: int) -> Tensor:
    """(B,) bool: our ``fixed_point`` with ``iters`` evaluations and torchdeq's ``fixed_point_iter`` with
    ``iters - 1`` keep the same iterate of a sample (see :func:`fixed_point_check`): ours ranks the
    residuals of z_0 .. z_{iters-1}, torchdeq those of z_0 .. z_{iters-2} (it returns the image of the
    best), so both rankings must end at their last entry."""
    return lowest_at_last(residuals, iters) & lowest_at_last(residuals, iters - 1)


def check_budget(model: nn.Module, x: Tensor, f_thres: int, seed: int = 0) -> int:
    """The largest budget T <= ``f_thres`` (at least 2) at which plain iteration keeps the same iterate
    on both sides for every sample (:func:`same_iterate`), so that :func:`fixed_point_check` can ask for
    equal outputs (``f_thres`` evaluations of f, no autograd); 2 if there is none."""
    res = forward_residuals(model, x, f_thres, seed)
    return next((t for t in range(f_thres, 1, -1) if bool(same_iterate(res, t).all())), 2)


def fixed_point_check(model: nn.Module, x: Tensor, y: Tensor, f_iters: int, b_iters: int, core: str = "sliced",
                      seed: int = 0) -> Dict[str, Any]:
    """Both sides with plain fixed-point iteration: the same outputs, the same or nearly the same gradients.

    Forward: ours runs ``fixed_point`` with ``f_thres = f_iters``: it evaluates f at z0 ... z_{T-1} and
    returns the lowest-residual iterate, z* = z_{T-1} while the residual decreases, whose differentiable
    application gives f^T(z0). torchdeq's ``fixed_point_iter`` returns the image of its lowest-residual
    iterate, so ``max_iter = T - 1`` gives the same z* and output, with one evaluation fewer (our last
    no-grad evaluation is the one the application repeats). For a sample whose residual is lowest
    before the end (it rises again over the last iterations: on the reference CIFAR model at large T,
    or with variational dropout), both keep that earlier iterate, torchdeq's image of it one application
    further along than ours, and that sample's output differs: ``lowest_last`` counts the samples for
    which both keep the last one (:func:`same_iterate`; :func:`check_budget` finds a T at which every
    sample does).

    Backward: ours iterates w <- J^T w + g from w = g, torchdeq from w = 0 (its first VJP gives g), both
    ``b_iters`` VJPs: both return sum_{i < b_iters} (J^T)^i g. torchdeq's hook IFT (``hook_ift=True``)
    takes J at z*, as ours, so its gradients must agree to rounding; its default ``torch.autograd.Function``
    takes J at f(z*), so they agree only to the forward residual. The same seed before each step gives
    every side the same dropout masks. ``x``: (B, C, H, W) images; ``y``: (B,) labels.

    Returns:
        ``out_max_abs`` / ``out_rel``: the largest absolute and the relative (norm) difference of the
        equilibrium outputs (B, D) (the larger over both torchdeq runs); ``logits_max_abs``;
        ``lowest_last``: the samples (of ``batch``) for which both sides keep the last iterate
        (:func:`same_iterate`), the condition for equal outputs; ``out_max_abs_lowest_last``: the
        largest absolute output difference over those; ``ours``: our counts; per torchdeq
        implicit differentiation (``ift_hook``, ``ift_function``): ``grad_cosine`` and ``grad_rel``, the
        cosine and relative difference of all parameter gradients as one vector, ``worst_param`` and
        ``worst_param_cosine``, the parameter whose gradient agrees least, and its counts.
    """
    if f_iters < 2 or b_iters < 1:
        raise ValueError(f"the fixed-point check needs f_iters >= 2 and b_iters >= 1, got {f_iters}, {b_iters}")
    clean = same_iterate(forward_residuals(model, x, f_iters, seed), f_iters)
    ours = our_solvers(model, "fixed_point")
    torch.manual_seed(seed)
    with ApplicationCounter(model.fullstage) as app:
        z_ours, logits_ours, info = our_train_step(model, x, y, f_iters, b_iters, ours, want_states=True)
    g_ours = _grads(model)
    out: Dict[str, Any] = {"f_iters": f_iters, "b_iters": b_iters, "peer_budget": [f_iters - 1, b_iters],
                           "out_max_abs": 0.0, "out_rel": 0.0, "logits_max_abs": 0.0, "out_max_abs_lowest_last": 0.0,
                           "lowest_last": int(clean.sum()), "batch": int(clean.numel()),
                           "f_rel_ours": info.f_rel, "b_fallback_ours": info.b_fallback,
                           "ours": _counts(app, *ours)}
    for key, hook_ift in (("ift_hook", True), ("ift_function", False)):
        # f_iters - 1 forward iterations: see above, the same z* as ours
        deq, pf, pb = build_peer(model, "fixed_point", f_iters, b_iters, core, hook_ift, budgets=(f_iters - 1, b_iters))
        torch.manual_seed(seed)
        with ApplicationCounter(model.fullstage) as app:
            z_peer, logits_peer, _ = peer_train_step(model, deq, x, y)
        z_diff = (z_ours - z_peer).double()
        out["out_max_abs"] = max(out["out_max_abs"], float(z_diff.abs().max()))
        if bool(clean.any()):
            out["out_max_abs_lowest_last"] = max(out["out_max_abs_lowest_last"], float(z_diff[clean].abs().max()))
        out["out_rel"] = max(out["out_rel"], float(z_diff.norm() / z_ours.double().norm().clamp_min(1e-30)))
        out["logits_max_abs"] = max(out["logits_max_abs"], float((logits_ours - logits_peer).abs().max()))
        out[key] = dict(_compare_grads(g_ours, _grads(model)), **_counts(app, pf, pb))
    model.zero_grad(set_to_none=True)
    return out


def _compare_grads(ours: Dict[str, Tensor], peer: Dict[str, Tensor]) -> Dict[str, Any]:
    """Cosine and relative difference of two sets of parameter gradients (as one vector each), and the
    parameter whose gradients agree least (lowest cosine)."""
    if set(ours) != set(peer):
        raise RuntimeError(f"the two sides' gradients reach different parameters: {sorted(set(ours) ^ set(peer))}")
    names = sorted(ours)
    a = torch.cat([ours[n].flatten() for n in names]).double()
    b = torch.cat([peer[n].flatten() for n in names]).double()
    per = {n: float(F.cosine_similarity(ours[n].flatten().double(), peer[n].flatten().double(), dim=0))
           for n in names}
    worst = min(per, key=per.get)
    return {"grad_cosine": float(F.cosine_similarity(a, b, dim=0)),
            "grad_rel": float((a - b).norm() / a.norm().clamp_min(1e-30)),
            "worst_param": worst, "worst_param_cosine": per[worst]}


# ---------------------------------------------------------------------------------------- timing
def alternate_medians(fns: Dict[str, Callable[[], Any]], repeats: int, device: torch.device | str,
                      warmup: int = 1) -> Dict[str, Dict[str, Any]]:
    """Median wall time (s) of each of ``fns``, timed in turns (a, b, a, b ...) ``repeats`` times each
    after ``warmup`` untimed turns: a slow phase of a shared machine then hits every side alike.

    Returns ``{name: {"median": s, "times": [s, ...]}}``.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            times[name].append(median_time(fn, 1, device, warmup=0))
    return {name: {"median": statistics.median(ts), "times": ts} for name, ts in times.items()}


def compare_training(model: nn.Module, x: Tensor, y: Tensor, solver: str, f_thres: int, b_thres: int,
                     repeats: int, core: str = "sliced", hook_ift: bool = False, match_evals: bool = True,
                     seed: int = 0) -> Dict[str, Any]:
    """One row of the training-step table: both sides' median step times (alternated), the counts of one
    counted step each (which is also the warm-up), and the speed-up peer / ours."""
    row: Dict[str, Any] = {"solver": solver}
    row.update(counted_train_steps(model, x, y, solver, f_thres, b_thres, core, hook_ift, match_evals, seed))
    ours = our_solvers(model, solver)
    deq, _, _ = build_peer(model, solver, f_thres, b_thres, core, hook_ift, match_evals)
    timed = alternate_medians({"ours": lambda: our_train_step(model, x, y, f_thres, b_thres, ours),
                               "peer": lambda: peer_train_step(model, deq, x, y)}, repeats, x.device, warmup=0)
    model.zero_grad(set_to_none=True)
    row.update(_timing_fields(timed))
    return row


def compare_forward(model: nn.Module, x: Tensor, solver: str, f_thres: int, repeats: int, core: str = "sliced",
                    match_evals: bool = True) -> Dict[str, Any]:
    """One row of the forward-solve table (eval mode, no autograd): median times, evaluations of f
    counted, and the relative residual each side reached (mean over the batch: ||f(z) - z|| / ||f(z)||
    at the returned state, measured here the same way for both)."""
    ours_solver = CountingSolver(model.call_solvers(solver)[0])
    deq, pf, _ = build_peer(model, solver, f_thres, f_thres, core, False, match_evals)
    z_ours = _our_forward_solve(model, x, f_thres, ours_solver)
    z_peer = _peer_forward_solve(model, deq, x)
    row: Dict[str, Any] = {"solver": solver, "ours_f_evals": ours_solver.calls, "peer_f_evals": pf.calls,
                           "peer_budget": deq.f_max_iter,
                           "ours_rel": _relative_residual(model, x, z_ours),
                           "peer_rel": _relative_residual(model, x, z_peer)}
    timed = alternate_medians({"ours": lambda: _our_forward_solve(model, x, f_thres, ours_solver),
                               "peer": lambda: _peer_forward_solve(model, deq, x)}, repeats, x.device, warmup=0)
    row.update(_timing_fields(timed))
    return row


def _relative_residual(model: nn.Module, x: Tensor, z: Tensor) -> float:
    """Mean over the batch of ||f(z) - z|| / ||f(z)|| for (B, D) ``z`` (eval mode)."""
    model.eval()
    with torch.no_grad(), weights_fixed(model.fullstage):
        fz = model.equilibrium_problem(model.injection(x)).f(z)
    return float(((fz - z).norm(dim=1) / fz.norm(dim=1).clamp_min(1e-30)).mean())


def _timing_fields(timed: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    ours, peer = timed["ours"]["median"], timed["peer"]["median"]
    return {"ours_ms": 1e3 * ours, "peer_ms": 1e3 * peer, "speedup": peer / ours,
            "ours_all_ms": [1e3 * t for t in timed["ours"]["times"]],
            "peer_all_ms": [1e3 * t for t in timed["peer"]["times"]]}


# ---------------------------------------------------------------------------------------- a whole run
def run_peer_comparison(spec: BenchSpec, f_thres: Optional[int], b_thres: Optional[int], solvers: Sequence[str],
                        repeats: int, core: str = "sliced", hook_ift: bool = False, match_evals: bool = True,
                        check: bool = True) -> Dict[str, Any]:
    """The whole comparison for ``spec`` (thresholds default to MODEL.F_THRES / B_THRES): the fixed-point
    agreement check (``check``), then per solver a training-step row and a forward-solve row. A
    JSON-able dict; :func:`format_table` prints it."""
    import_torchdeq()     # fail before building anything
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model, x, y = build(spec)
    # the training steps move BatchNorm's running statistics, which the eval-mode forward solves read:
    # each forward row starts from the loaded model's, whatever ran before it
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    f_thres = int(model.f_thres if f_thres is None else f_thres)
    b_thres = int(model.b_thres if b_thres is None else b_thres)
    settings = model.solver_settings["f"]
    out: Dict[str, Any] = {
        "cfg": spec.cfg, "opts": list(spec.opts), "batch": spec.batch_size, "image_size": spec.image_size,
        "weights": spec.test_model, "device": str(x.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0], "torchdeq": torchdeq_version(),
        "cpu": cpu_model() or platform.processor() or platform.machine(),
        "f_thres": f_thres, "b_thres": b_thres, "memory": int(settings.get("memory", 0)),
        "stop_mode": settings.get("stop_mode", "rel"), "core": core, "hook_ift": bool(hook_ift),
        "match_evals": bool(match_evals), "repeats": int(repeats), "train": [], "forward": []}
    if check:
        # at a budget where both sides keep the last iterate of every sample: see fixed_point_check
        f_check = check_budget(model, x, f_thres, spec.seed)
        b_check = min(b_thres, f_check)
        logger.info("fixed-point check at %d / %d iterations", f_check, b_check)
        out["fixed_point_check"] = fixed_point_check(model, x, y, f_check, b_check, core, spec.seed)
    for s in solvers:
        logger.info("training steps with %s (ours, torchdeq alternated, %d each)", s, repeats)
        out["train"].append(compare_training(model, x, y, s, f_thres, b_thres, repeats, core, hook_ift,
                                             match_evals, spec.seed))
        logger.info("forward solves with %s", s)
        _restore_buffers(model, buffers)
        out["forward"].append(compare_forward(model, x, s, f_thres, repeats, core, match_evals))
    return out


def _restore_buffers(model: nn.Module, saved: Dict[str, Tensor]) -> None:
    """Copy the ``saved`` buffers (BatchNorm's running statistics ...) back into ``model``."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(saved[name])


# ---------------------------------------------------------------------------------------- the report
def _pair(row: Dict[str, Any], key: str) -> str:
    return f"{row['ours'][key]} / {row['peer'][key]}"


def format_table(result: Dict[str, Any]) -> str:
    """Markdown: a header line (config, batch, threads, versions, CPU), the training-step table, the
    forward-solve table and the fixed-point check's line, from a :func:`run_peer_comparison` result."""
    r = result
    overrides = f" {' '.join(map(str, r['opts']))}" if r.get("opts") else ""
    lines = [f"**{r['cfg']}**{overrides}, batch {r['batch']}, {r['image_size']}x{r['image_size']}, {r['device']} "
             f"({r['cpu']}), {r['threads']} threads, torch {r['torch']}, torchdeq {r['torchdeq'] or '?'}; "
             f"T_f={r['f_thres']}, T_b={r['b_thres']}, memory {r['memory']}, stop mode {r['stop_mode']}, "
             f"tolerance 0; torchdeq core {r['core']}, IFT {'hook' if r['hook_ift'] else 'autograd.Function'}, "
             f"budgets {'matched to equal evaluation counts' if r['match_evals'] else 'as given'}; "
             f"median of {r['repeats']} alternated steps", "",
             "Training step (zero_grad, forward solve, head, cross-entropy, implicit backward):", "",
             "| solver | ours (ms) | torchdeq (ms) | speed-up (peer/ours) | f evals ours/peer forward "
             "| f with graph ours/peer | adjoint steps ours/peer | torchdeq max_iter f/b |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r.get("train", []):
        lines.append(f"| {row['solver']} | {row['ours_ms']:.1f} | {row['peer_ms']:.1f} | {row['speedup']:.2f}x | "
                     f"{_pair(row, 'f_evals')} | {_pair(row, 'f_graph')} | {_pair(row, 'adjoint')} | "
                     f"{row['peer_budget'][0]} / {row['peer_budget'][1]} |")
    lines += ["", "Forward solve alone (eval mode, no autograd):", "",
              "| solver | ours (ms) | torchdeq (ms) | speed-up (peer/ours) | f evals ours/peer "
              "| rel. residual ours/peer |", "|---|---:|---:|---:|---:|---:|"]
    for row in r.get("forward", []):
        lines.append(f"| {row['solver']} | {row['ours_ms']:.1f} | {row['peer_ms']:.1f} | {row['speedup']:.2f}x | "
                     f"{row['ours_f_evals']} / {row['peer_f_evals']} | "
                     f"{row['ours_rel']:.2e} / {row['peer_rel']:.2e} |")
    chk = r.get("fixed_point_check")
    if chk:
        lines += ["", f"Fixed-point check ({chk['f_iters']} / {chk['b_iters']} iterations, torchdeq max_iter "
                      f"{chk['peer_budget'][0]} / {chk['peer_budget'][1]}, our residual "
                      f"rel. {chk['f_rel_ours']:.2e}, both keep the last iterate for {chk['lowest_last']} of "
                      f"{chk['batch']} samples): outputs max |diff| {chk['out_max_abs']:.2e} "
                      f"(relative {chk['out_rel']:.2e}; "
                      f"{chk['out_max_abs_lowest_last']:.2e} over those samples), logits max |diff| "
                      f"{chk['logits_max_abs']:.2e}.", ""]
        for key, what in (("ift_hook", "hook IFT (J at z*, as ours)"),
                          ("ift_function", "autograd.Function IFT (J at f(z*))")):
            c = chk[key]
            lines.append(f"- gradients vs torchdeq {what}: cosine {c['grad_cosine']:.6f}, relative difference "
                         f"{c['grad_rel']:.2e}, least similar {c['worst_param']} (cosine "
                         f"{c['worst_param_cosine']:.4f})")
    return "\n".join(lines) + "\n"
