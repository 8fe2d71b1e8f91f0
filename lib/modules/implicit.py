"""Implicit differentiation of an equilibrium z* = f(z*; x, theta).

Forward: the solver runs without autograd. Then one application of f with autograd,
``z = f(z*)`` (z* a fresh leaf), connects the result to theta and x, and a hook on ``z`` replaces the incoming
gradient ``dl/dz`` by the solution ``w`` of the adjoint system

    w = J_f(z*)^T w + dl/dz        i.e.  (I - J_f^T) w = dl/dz,

which autograd then pushes through ``f`` to theta and x: ``dl/dtheta = w^T df/dtheta``, the
implicit-function-theorem gradient. The adjoint system is itself a fixed-point problem
(in w), solved by the chosen solver under ``b_thres``; its vector-Jacobian products reuse the
graph of that one application of f, so memory does not grow with the number of solver steps.

If the backward solve does not improve on its start (w0 = dl/dz, the one-step / Jacobian-free
gradient), that start is used, which is a descent direction, and the fallback is recorded;
it never returns zeros as the original implementation does.

:func:`attach_phantom_backward` replaces the adjoint solve by ``k`` damped steps
``z <- (1 - tau) z + tau f(z)`` from z*, differentiated by ordinary backprop (phantom gradients,
Geng et al., NeurIPS 2021); ``k = 1, tau = 1`` is the Jacobian-free / one-step gradient (Fung et
al., AAAI 2022). Their memory grows with ``k``, not with the forward solver's steps.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Optional, Tuple

import torch

from ..solvers.residuals import SolverResult

logger = logging.getLogger(__name__)


def _adjoint_solve(z: torch.Tensor, z_leaf: torch.Tensor, grad: torch.Tensor, solver: Callable[..., SolverResult],
                   threshold: int, solver_kwargs: Dict) -> Tuple[torch.Tensor, SolverResult, bool]:
    """(w, the solve's result, whether it fell back to ``grad``) for ``w = J_f^T w + grad``; ``z``
    (B, D) is f(z_leaf) with its graph, ``grad`` (B, D) the incoming dl/dz."""
    def adjoint_map(w: torch.Tensor) -> torch.Tensor:
        (jtw,) = torch.autograd.grad(z, z_leaf, w, retain_graph=True)
        return jtw + grad

    with torch.autocast(grad.device.type, enabled=False):
        w0 = grad.detach().to(torch.promote_types(grad.dtype, torch.float32))
        result = solver(adjoint_map, w0, threshold, **solver_kwargs)
    w = result.z
    fallback = (not result.improved) or (not torch.isfinite(w).all().item())
    if fallback:
        logger.debug("implicit backward: the adjoint solve did not improve on dl/dz "
                     "(rel residual %.3g after %d steps); using the one-step gradient",
                     result.rel_residual, result.steps)
    return (grad if fallback else w), result, fallback


def attach_implicit_backward(f: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor,
                             solver: Callable[..., SolverResult], threshold: int,
                             on_backward: Optional[Callable[[SolverResult, bool], None]] = None,
                             on_application: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None,
                             **solver_kwargs) -> torch.Tensor:
    """Return ``f(z_star)`` with autograd, its gradient routed through the adjoint solve.

    Args:
        f: the equilibrium map on flattened states, (B, D) -> (B, D); must be the same function
            (same dropout masks, same weights) as in the forward solve.
        z_star: (B, D) the equilibrium found by the forward solver (detached).
        solver: a fixed-point solver (see :mod:`mdeq.solvers`).
        threshold: the largest number of backward solver steps (B_THRES).
        on_backward: called as ``on_backward(result, fallback)`` when the backward pass has run the
            adjoint solve (e.g. :meth:`mdeq.modules.equilibrium.EquilibriumInfo.record_backward`).
        on_application: called as ``on_application(z_in, f(z_in))`` with the one differentiable
            application of f, before the adjoint hook is attached (so that VJPs taken there, e.g.
            the Jacobian regulariser's, do not trigger the adjoint solve); only when autograd is on.
        solver_kwargs: ``eps``, ``stop_mode``, ``memory``... for the solver.

    Returns:
        (B, D) ``f(z_star)``, equal to ``z_star`` up to the forward residual.
    """
    z_leaf = z_star.detach().requires_grad_(torch.is_grad_enabled())
    z = f(z_leaf)
    if not z.requires_grad:
        return z
    if on_application is not None:
        on_application(z_leaf, z)
    busy = [False]  # the adjoint solve differentiates z itself: do not re-enter the hook

    def adjoint_hook(grad: torch.Tensor) -> Optional[torch.Tensor]:
        if busy[0]:
            return None
        busy[0] = True
        try:
            w, result, fallback = _adjoint_solve(z, z_leaf, grad, solver, threshold, solver_kwargs)
        finally:
            busy[0] = False
        if on_backward is not None:
            on_backward(result, fallback)
        return w.to(grad.dtype)

    # The hook goes on an alias of z, not on z: a hook on z would be kept by z's own graph node while
    # its closure keeps z (and through it that graph) alive, a reference cycle through autograd's C++
    # nodes that Python's garbage collector cannot see, so every training step's graph of f would
    # stay in memory. The alias's node keeps the hook; nothing the hook reaches keeps that node.
    out = z.view_as(z)
    out.register_hook(adjoint_hook)
    return out


def attach_phantom_backward(f: Callable[[torch.Tensor], torch.Tensor], z_star: torch.Tensor, steps: int,
                            tau: float,
                            on_application: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
                            ) -> torch.Tensor:
    """Phantom gradient: ``steps`` damped steps ``z <- (1 - tau) z + tau f(z)`` from z*, with autograd.

    Backprop through these steps approximates the implicit gradient (exactly so as ``steps`` grows
    for ``tau = 1`` and a contractive f); ``steps = 1, tau = 1`` is the Jacobian-free gradient
    ``dl/dz . df/dtheta``. No adjoint solve runs, and the graph holds ``steps`` applications of f.

    Args:
        f: the equilibrium map on flattened states, (B, D) -> (B, D).
        z_star: (B, D) the forward solver's equilibrium (detached).
        steps: k >= 1, the number of damped steps.
        tau: the damping in (0, 1].
        on_application: called as ``on_application(z_in, f(z_in))`` for the first step (at z*).

    Returns:
        (B, D) the last iterate (``f(z*)`` for k = 1, tau = 1).
    """
    if steps < 1:
        raise ValueError(f"phantom steps = {steps} must be >= 1")
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"phantom tau = {tau} must lie in (0, 1]")
    # z* needs a gradient only for the regulariser's VJP: otherwise backprop may stop at f's input
    z = z_star.detach().requires_grad_(torch.is_grad_enabled() and on_application is not None)
    for k in range(steps):
        fz = f(z)
        if k == 0 and on_application is not None and fz.requires_grad:
            on_application(z, fz)
        z = fz if tau == 1.0 else (1.0 - tau) * z + tau * fz
    return z
