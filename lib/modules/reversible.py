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
weights, dropout masks); a backward whose f reads other tensors needing a gradient is an error, and
the reconstruction error (how far the rebuilt start lies from z0) tells a changed f, or rounding
grown too large, apart from an exact inversion.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
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
    """Within the block, records every tensor that needs a gradient and that a torch operation reads
    without the block having made it: the tensors a function closes over (parameters, an input
    injection), as opposed to its own intermediates. ``tensors`` keeps them in the order first read."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: List[Tensor] = []
        self._seen: Dict[int, Tensor] = {}
        self._made: Dict[int, Tensor] = {}   # kept alive, so that an id is not reused within the block

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, Tensor) and t.requires_grad and id(t) not in self._made and id(t) not in self._seen:
                self._seen[id(t)] = t
                self.tensors.append(t)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._made[id(t)] = t
        return out


def captured_tensors(f: FixedPointMap, z: Tensor) -> Tuple[Tensor, List[Tensor]]:
    """``(f(z), the tensors f reads that need a gradient)`` (see :class:`CapturedTensors`); ``z`` is
    passed detached, so it is not one of them. A compiled f runs eagerly here, so that its reads are seen."""
    with torch.compiler.set_stance("force_eager"), CapturedTensors() as mode:
        out = f(z.detach())
    return out, mode.tensors


def reconstruction_error(y0: Tensor, z0_rebuilt: Tensor, z0: Tensor, z_final: Tensor) -> float:
    """max(||y_0' - z0||, ||z_0' - z0||) / max(||z0||, ||z_N||): how far the rebuilt start (y_0', z_0')
    lies from the true one, relative to the size of the states (z0 is often 0)."""
    err = max(float((y0 - z0).double().norm()), float((z0_rebuilt - z0).double().norm()))
    return err / max(float(z0.double().norm()), float(z_final.double().norm()), _TINY)


def _vjp(f: FixedPointMap, state: Tensor, cotangent: Tensor, captured: Sequence[Tensor], f_dtype: torch.dtype,
         check: bool = False) -> Tuple[Tensor, Tensor, List[Optional[Tensor]]]:
    """(f(state) detached, J_f(state)^T cotangent, [cotangent^T df/dc for c in captured]) by one
    evaluation of f, on ``state`` cast to ``f_dtype``, with autograd (the first two in the state's dtype);
    ``check``: first make sure that f reads no tensor needing a gradient beyond ``captured`` (see
    :func:`_check_reads`)."""
    with torch.enable_grad():
        leaf = state.detach().to(f_dtype).requires_grad_(True)
        if check:
            with torch.compiler.set_stance("force_eager"), CapturedTensors() as mode:
                out = f(leaf)
            _check_reads(mode.tensors, [leaf, *captured])
        else:
            out = f(leaf)
        grads = torch.autograd.grad(out, [leaf, *captured], cotangent.to(out.dtype), allow_unused=True)
    d_state = grads[0] if grads[0] is not None else torch.zeros_like(state)
    return out.detach().to(state.dtype), d_state.to(state.dtype), list(grads[1:])


def _check_reads(read: Sequence[Tensor], known: Sequence[Tensor]) -> None:
    """Raise when f read tensors needing a gradient (``read``) beyond ``known``: in the backward, a
    tensor it did not read in the forward (e.g. weights recomputed after the context that fixed them for
    the call has ended), whose gradient would be lost."""
    ids = {id(t) for t in known}
    new = [tuple(t.shape) for t in read if id(t) not in ids]
    if new:
        raise RuntimeError(f"reversible backward: f reads {len(new)} tensor(s) needing a gradient (shapes {new[:4]}) "
                           "that it did not read in the forward pass; f must be the same function in the backward "
                           "(it is evaluated again there), e.g. weights fixed for the call must stay fixed")


def _accumulate(total: List[Optional[Tensor]], grads: Sequence[Optional[Tensor]]) -> None:
    for i, g in enumerate(grads):
        if g is not None:
            total[i] = g if total[i] is None else total[i] + g


def reversible_backward(f: FixedPointMap, y_n: Tensor, z_n: Tensor, z0: Tensor, steps: int, beta: float,
                        grad_z: Tensor, captured: Sequence[Tensor]
                        ) -> Tuple[Tensor, List[Optional[Tensor]], Tensor, Tensor]:
    """Backpropagate ``grad_z`` = dl/dz_N (B, D) through ``steps`` coupled steps from ``z0`` that ended at
    (``y_n``, ``z_n``, in the state dtype; f runs in z0's), rebuilding the states on the way. The first step's second evaluation, f(z_0), is
    differentiated at the true ``z0``, not at the rebuilt z_0' (the rebuilt states drift most there).

    Returns:
        (dl/dz0 (B, D), [dl/dc for c in ``captured``] (None: no gradient), y_0', z_0' the rebuilt start).
    """
    y, z = y_n, z_n
    a_z = grad_z.to(z.dtype)
    a_y = torch.zeros_like(a_z)
    totals: List[Optional[Tensor]] = [None] * len(captured)
    for n in range(steps):
        fy, jt, grads = _vjp(f, y, beta * a_z, captured, z0.dtype, check=n == 0)  # z_{n+1} = (1-b) z_n + b f(y_{n+1})
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
    return a_y + a_z, totals, y, z


class ReversibleRun:
    """What one forward solve leaves its backward besides the saved states: f, the captured tensors, the
    steps and beta, and ``on_backward(steps, error)``, called with the reconstruction error."""

    def __init__(self, f: FixedPointMap, captured: Sequence[Tensor], steps: int, beta: float,
                 on_backward: Optional[Callable[[int, float], None]] = None) -> None:
        self.f, self.captured, self.steps, self.beta = f, list(captured), int(steps), check_beta(beta)
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
                                                               run.captured)
        if run.on_backward is not None:
            run.on_backward(run.steps, reconstruction_error(y0, z0_rebuilt, z0, z_n))
        return (None, None, None, d_z0.to(z0.dtype),
                *[None if g is None else g.to(c.dtype) for g, c in zip(d_captured, run.captured)])


def solve_reversible(solver: Callable[..., ReversibleResult], f: FixedPointMap, z0: Tensor, threshold: int,
                     **solver_kwargs) -> Tuple[ReversibleResult, List[Tensor]]:
    """Run the reversible ``solver`` without autograd and find the tensors f reads that need a gradient
    (during its first evaluation, at no extra cost)."""
    found: List[List[Tensor]] = []

    def first_recorded(z: Tensor) -> Tensor:
        if found:
            return f(z)
        out, tensors = captured_tensors(f, z)
        found.append(tensors)
        return out

    with torch.no_grad():
        result = solver(first_recorded, z0.detach(), threshold, **solver_kwargs)
    if not isinstance(result, ReversibleResult):
        raise TypeError(f"the reversible backward needs the reversible forward solver; {solver!r} returned a "
                        f"{type(result).__name__}")
    return result, found[0]


def attach_reversible_backward(f: FixedPointMap, z0: Tensor, result: ReversibleResult, captured: Sequence[Tensor],
                               on_backward: Optional[Callable[[int, float], None]] = None) -> Tensor:
    """(B, D) z_N of ``result`` connected to z0 and ``captured`` by the reversible backward."""
    run = ReversibleRun(f, captured, result.steps, result.beta, on_backward)
    return _Reversible.apply(run, result.y, result.z_state, z0, *captured)


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
