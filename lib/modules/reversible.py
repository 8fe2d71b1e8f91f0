"""The reversible backward (RevDEQ, McCallum, Arora & Foster 2025): the exact gradient of the N
coupled steps of :func:`mdeq.solvers.reversible`, with memory that does not grow with N.

The forward solve keeps only its final states (y_N, z_N). The backward pass rebuilds the states one
step at a time from the end,

    z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta),   y_n = (y_{n+1} - beta f(z_n)) / (1 - beta),

and backpropagates through that step's two evaluations of f, which it makes again with autograd,
one graph of f at a time. With the adjoints a_y, a_z of (y_{n+1}, z_{n+1}):

    z_{n+1} = (1 - beta) z_n + beta f(y_{n+1}):  a_y += beta J_f(y_{n+1})^T a_z,  a_z <- (1 - beta) a_z
    y_{n+1} = (1 - beta) y_n + beta f(z_n):      a_z += beta J_f(z_n)^T a_y,      a_y <- (1 - beta) a_y

and the parameters of f (and the injection) collect ``beta v^T df/dtheta`` at each evaluation. The
gradient of z0 is a_y + a_z at the end.

f is any function of the state; the tensors it reads that need a gradient (its parameters, the
input injection, weights computed before the call) are found by :class:`CapturedTensors` while the
forward solve makes its first evaluation, and become inputs of the autograd function, whose backward
returns their gradients; autograd carries those further up (to the stem, to weight-norm's g and v).
The backward evaluates f again, so f must then be the same function as in the forward (the same
weights, dropout masks, train/eval flags): the backward's first evaluation is checked against what the
forward's first one read (:func:`_check_reads`), an f that changes tensors in place when it runs
(normalisation statistics) is refused, and a captured tensor left without a gradient is an error. The
reconstruction error (how far the rebuilt start lies from z0) tells rounding grown too large apart
from an exact inversion.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from ..solvers.reversible import ReversibleResult, check_beta

logger = logging.getLogger(__name__)
Tensor = torch.Tensor
FixedPointMap = Callable[[Tensor], Tensor]
_TINY = 1e-30

#: the reconstruction error (see :func:`reconstruction_error`) above which the backward warns: the
#: rebuilt states, and so the gradient, have drifted from the forward's (docs/reversible.md measures it)
DRIFT_WARNING = 1e-3


class CapturedTensors(TorchFunctionMode):
    """Within the block, records every tensor that a torch operation reads without the block having made
    it (nor being one of ``inputs``): the tensors a function closes over (parameters, an input injection,
    dropout masks, normalisation statistics), as opposed to its own intermediates.

    Attributes:
        tensors: those that need a gradient, in the order first read.
        read: all of them, each with its version counter when first read (``Tensor._version``, which
            every in-place change raises).
    """

    def __init__(self, inputs: Sequence[Tensor] = ()) -> None:
        super().__init__()
        self.tensors: List[Tensor] = []
        self.read: List[Tuple[Tensor, int]] = []
        self._seen: Dict[int, Tensor] = {id(t): t for t in inputs}
        self._made: Dict[int, Tensor] = {}   # kept alive, so that an id is not reused within the block
        self._updated: List[Tensor] = []      # running statistics that a normalisation in training mode updates

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm or func is F.instance_norm:
            self._updated.extend(_running_statistics(func, args, kwargs))
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and id(t) not in self._made and id(t) not in self._seen:
                self._seen[id(t)] = t
                self.read.append((t, t._version))
                if t.requires_grad:
                    self.tensors.append(t)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._made[id(t)] = t
        return out

    def modified(self) -> List[Tensor]:
        """The read tensors changed in place since they were first read (by the function itself, when
        called at the block's end): those whose version counter moved, and the running statistics that a
        batch or instance normalisation in training mode updated (its kernel leaves their counters)."""
        updated = {id(t) for t in self._updated}
        return [t for t, version in self.read if t._version != version or id(t) in updated]


def _running_statistics(func: Callable, args: tuple, kwargs: dict) -> List[Tensor]:
    """The running mean and variance that ``F.batch_norm`` / ``F.instance_norm`` called with ``args`` and
    ``kwargs`` update: those it is given, when it normalises by the batch's statistics."""
    names = (["input", "running_mean", "running_var", "weight", "bias", "training"] if func is F.batch_norm else
             ["input", "running_mean", "running_var", "weight", "bias", "use_input_stats"])
    bound = {**dict(zip(names, args)), **kwargs}
    by_batch = bound.get(names[-1], func is F.instance_norm)   # instance_norm's use_input_stats defaults to True
    stats = [bound.get("running_mean"), bound.get("running_var")]
    return [t for t in stats if isinstance(t, Tensor)] if by_batch else []


def captured_tensors(f: FixedPointMap, z: Tensor) -> Tuple[Tensor, CapturedTensors]:
    """``(f(z), what f read)``: the tensors it closes over, those needing a gradient among them (see
    :class:`CapturedTensors`); ``z`` itself is not one of them. A compiled f runs eagerly here, so that its
    reads are seen. An f that changes a tensor in place when it runs (BatchNorm's running statistics in
    training mode) is refused: the backward evaluates it 2N more times, changing it again each time."""
    with torch.compiler.set_stance("force_eager"), CapturedTensors([z]) as mode:
        out = f(z)
    changed = mode.modified()
    if changed:
        raise ValueError(f"reversible backward: f changes {len(changed)} tensor(s) in place when it runs (shapes "
                         f"{_shapes(changed)}), e.g. BatchNorm's running statistics in training mode; the backward "
                         "evaluates f again, 2 times per step, and would change them again: use a normalisation "
                         "without running statistics (GroupNorm), BatchNorm in eval mode, or another MODEL.GRAD")
    return out, mode


def _shapes(tensors: Sequence[Tensor]) -> List[Tuple[int, ...]]:
    return [tuple(t.shape) for t in tensors[:4]]


def reconstruction_error(y0: Tensor, z0_rebuilt: Tensor, z0: Tensor, z_final: Tensor) -> float:
    """max(||y_0' - z0||, ||z_0' - z0||) / max(||z0||, ||z_N||): how far the rebuilt start (y_0', z_0')
    lies from the true one, relative to the size of the states (z0 is often 0)."""
    err = max(float((y0 - z0).double().norm()), float((z0_rebuilt - z0).double().norm()))
    return err / max(float(z0.double().norm()), float(z_final.double().norm()), _TINY)


def _vjp(f: FixedPointMap, state: Tensor, cotangent: Tensor, captured: Sequence[Tensor], f_dtype: torch.dtype,
         forward_reads: Optional[Sequence[Tuple[Tensor, int]]] = None) -> Tuple[Tensor, Tensor, List[Optional[Tensor]]]:
    """(f(state) detached, J_f(state)^T cotangent, [cotangent^T df/dc for c in captured]) by one
    evaluation of f, on ``state`` cast to ``f_dtype``, with autograd (the first two in the state's dtype);
    with ``forward_reads`` (what f read in the forward, :attr:`CapturedTensors.read`), first make sure
    that f is still the forward's function (see :func:`_check_reads`)."""
    with torch.enable_grad():
        leaf = state.detach().to(f_dtype).requires_grad_(True)
        if forward_reads is not None:
            with torch.compiler.set_stance("force_eager"), CapturedTensors([leaf]) as mode:
                out = f(leaf)
            _check_reads(mode, forward_reads, captured)
        else:
            out = f(leaf)
        grads = torch.autograd.grad(out, [leaf, *captured], cotangent.to(out.dtype), allow_unused=True)
    d_state = grads[0] if grads[0] is not None else torch.zeros_like(state)
    return out.detach().to(state.dtype), d_state.to(state.dtype), list(grads[1:])


def _check_reads(backward: CapturedTensors, forward_reads: Sequence[Tuple[Tensor, int]],
                 captured: Sequence[Tensor]) -> None:
    """Raise when f, evaluated again in the backward (what it read: ``backward``), is not the function the
    forward solve iterated (what it read then: ``forward_reads``): it reads a tensor needing a gradient
    that the forward did not (weights recomputed after the context that fixed them for the call ended:
    their gradient would be lost), no longer reads one the forward did (a dropout mask drawn again by
    another call, dropout off after ``model.eval()``), or reads one changed in place since the forward."""
    known = {id(t) for t in captured}
    new = [t for t in backward.tensors if id(t) not in known]
    if new:
        raise RuntimeError(f"reversible backward: f reads {len(new)} tensor(s) needing a gradient (shapes "
                           f"{_shapes(new)}) that it did not read in the forward pass; f must be the same function "
                           "in the backward (it is evaluated again there), e.g. weights fixed for the call must "
                           "stay fixed")
    now = {id(t) for t, _ in backward.read}
    gone = [t for t, _ in forward_reads if id(t) not in now]
    if gone:
        raise RuntimeError(f"reversible backward: f no longer reads {len(gone)} tensor(s) that it read in the "
                           f"forward pass (shapes {_shapes(gone)}): it changed between the forward and the "
                           "backward, e.g. another call drew new dropout masks or model.eval() turned dropout off; "
                           "run the backward before the model is called again or switched to eval mode")
    changed = [t for t, version in forward_reads if t._version != version]
    if changed:
        raise RuntimeError(f"reversible backward: {len(changed)} tensor(s) that f reads (shapes {_shapes(changed)}) "
                           "were changed in place after the forward pass (e.g. by an optimizer step); the backward "
                           "must run before f's tensors change")


def _accumulate(total: List[Optional[Tensor]], grads: Sequence[Optional[Tensor]]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


def reversible_backward(f: FixedPointMap, y_n: Tensor, z_n: Tensor, z0: Tensor, steps: int, beta: float,
                        grad_z: Tensor, captured: Sequence[Tensor],
                        forward_reads: Optional[Sequence[Tuple[Tensor, int]]] = None
                        ) -> Tuple[Tensor, List[Tensor], Tensor, Tensor]:
    """Backpropagate ``grad_z`` = dl/dz_N (B, D) through ``steps`` coupled steps from ``z0`` that ended at
    (``y_n``, ``z_n``, in the state dtype; f runs in z0's), rebuilding the states on the way. The first
    step's second evaluation, f(z_0), is differentiated at the true ``z0``, not at the rebuilt z_0' (the
    rebuilt states drift most there). ``forward_reads``: what f read in the forward
    (:attr:`CapturedTensors.read`), checked against the backward's first evaluation (:func:`_check_reads`).

    Returns:
        (dl/dz0 (B, D), [dl/dc for c in ``captured``], y_0', z_0' the rebuilt start).

    Raises:
        RuntimeError: f is not the forward's function (:func:`_check_reads`), or a captured tensor got no
            gradient at any evaluation: f read it in the forward but does not differentiate through it now.
    """
    y, z = y_n, z_n
    a_z = grad_z.to(z.dtype)
    a_y = torch.zeros_like(a_z)
    totals: List[Optional[Tensor]] = [None] * len(captured)
    for n in range(steps):
        reads = (forward_reads or ()) if n == 0 else None                  # checked at the first evaluation
        fy, jt, grads = _vjp(f, y, beta * a_z, captured, z0.dtype, reads)  # z_{n+1} = (1-b) z_n + b f(y_{n+1})
        a_y = a_y + jt
        _accumulate(totals, grads)
        z = (z - beta * fy) / (1 - beta)
        a_z = (1 - beta) * a_z
        start = z0.to(z.dtype) if n == steps - 1 else z
        fz, jt, grads = _vjp(f, start, beta * a_y, captured, z0.dtype)    # y_{n+1} = (1-b) y_n + b f(z_n)
        a_z = a_z + jt
        _accumulate(totals, grads)
        y = (y - beta * fz) / (1 - beta)
        a_y = (1 - beta) * a_y
    unused = [c for c, g in zip(captured, totals) if g is None]
    if unused:
        raise RuntimeError(f"reversible backward: {len(unused)} tensor(s) that f read in the forward pass (shapes "
                           f"{_shapes(unused)}) received no gradient: f does not differentiate through them when it "
                           "is evaluated again (it changed, or reads them only in a non-differentiable way: detach "
                           "them inside f if they are not to be trained)")
    return a_y + a_z, totals, y, z  # type: ignore[return-value]


class ReversibleRun:
    """What one forward solve leaves its backward besides the saved states: f, what f read in the forward
    (:class:`CapturedTensors`: the captured tensors needing a gradient, and all it read), the steps and
    beta, and ``on_backward(steps, error)``, called with the reconstruction error."""

    def __init__(self, f: FixedPointMap, reads: CapturedTensors, steps: int, beta: float,
                 on_backward: Optional[Callable[[int, float], None]] = None) -> None:
        self.f, self.steps, self.beta = f, int(steps), check_beta(beta)
        self.captured, self.forward_reads = list(reads.tensors), list(reads.read)
        self.on_backward = on_backward


class DriftWarning:
    """Warns (``logging``) when a reversible backward's reconstruction error exceeds ``threshold``: the
    1st, 10th, 100th ... time, so that a training run that drifts on every step says so without flooding
    its log."""

    def __init__(self, threshold: float = DRIFT_WARNING) -> None:
        self.threshold, self.count = float(threshold), 0

    def __call__(self, steps: int, beta: float, error: float) -> None:
        if error <= self.threshold:
            return
        self.count += 1
        if str(self.count).rstrip("0") == "1":     # the 1st, 10th, 100th ... time
            logger.warning("reversible backward: the rebuilt start lies %.3g (relative) from z0 after %d steps at "
                           "beta %g (%d backward(s) above %g so far): the gradient has drifted from that of the "
                           "forward's steps; fewer steps, or a beta nearer 0.5, cut it (docs/reversible.md)",
                           error, steps, beta, self.count, self.threshold)


class _Reversible(torch.autograd.Function):
    """z_N as a function of (z0, *captured); the backward is :func:`reversible_backward`. Saved for the
    backward: y_N, z_N and z0, whatever N is (the captured tensors are the function's own inputs)."""

    @staticmethod
    def forward(ctx, run: ReversibleRun, y_n: Tensor, z_n: Tensor, z0: Tensor, *captured: Tensor) -> Tensor:
        ctx.run = run
        ctx.save_for_backward(y_n, z_n, z0)
        return z_n.to(z0.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad_z: Tensor):
        run: ReversibleRun = ctx.run
        y_n, z_n, z0 = ctx.saved_tensors
        d_z0, d_captured, y0, z0_rebuilt = reversible_backward(run.f, y_n, z_n, z0, run.steps, run.beta, grad_z,
                                                               run.captured, run.forward_reads)
        if run.on_backward is not None:
            run.on_backward(run.steps, reconstruction_error(y0, z0_rebuilt, z0, z_n))
        return (None, None, None, d_z0.to(z0.dtype),
                *[g.to(c.dtype) for g, c in zip(d_captured, run.captured)])


def solve_reversible(solver: Callable[..., ReversibleResult], f: FixedPointMap, z0: Tensor, threshold: int,
                     **solver_kwargs) -> Tuple[ReversibleResult, CapturedTensors]:
    """Run the reversible ``solver`` without autograd and record what f reads (:func:`captured_tensors`,
    during its first evaluation, at no extra cost)."""
    found: List[CapturedTensors] = []

    def first_recorded(z: Tensor) -> Tensor:
        if found:
            return f(z)
        out, reads = captured_tensors(f, z)
        found.append(reads)
        return out

    with torch.no_grad():
        result = solver(first_recorded, z0.detach(), threshold, **solver_kwargs)
    if not isinstance(result, ReversibleResult):
        raise TypeError(f"the reversible backward needs the reversible forward solver; {solver!r} returned a "
                        f"{type(result).__name__}")
    return result, found[0]


def attach_reversible_backward(f: FixedPointMap, z0: Tensor, result: ReversibleResult, reads: CapturedTensors,
                               on_backward: Optional[Callable[[int, float], None]] = None) -> Tensor:
    """(B, D) z_N of ``result`` connected to z0 and the captured tensors (``reads.tensors``) by the
    reversible backward."""
    run = ReversibleRun(f, reads, result.steps, result.beta, on_backward)
    return _Reversible.apply(run, result.y, result.z_state, z0, *run.captured)


def coupled_steps(f: FixedPointMap, z0: Tensor, steps: int, beta: float, float64_states: bool = False) -> Tensor:
    """z_N of ``steps`` coupled steps from y_0 = z_0 = z0 (states in float64 if ``float64_states``, f in
    z0's dtype), with autograd recording all of them (memory grows with ``steps``): the reference the
    reversible backward must equal, and what it saves."""
    beta = check_beta(beta)
    sd = torch.float64 if float64_states else z0.dtype
    y = z = z0.to(sd)
    for _ in range(steps):
        y = (1 - beta) * y + beta * f(z.to(z0.dtype)).to(sd)
        z = (1 - beta) * z + beta * f(y.to(z0.dtype)).to(sd)
    return z.to(z0.dtype)
