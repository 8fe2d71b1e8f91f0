"""Jacobian diagnostics of an equilibrium map f at z*: the Hutchinson estimate of ||J_f||_F^2
(Jacobian regularisation, Bai, Koltun & Kolter, ICML 2021) and a power-method estimate of the
spectral radius of J_f.

Both work from vector-Jacobian products of one differentiable application ``z_out = f(z_in)``,
so the regulariser reuses the graph the backward pass already builds instead of a second one.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

Tensor = torch.Tensor


def hutchinson_jac_loss(z_in: Tensor, z_out: Tensor, probes: int = 1,
                        generator: Optional[torch.Generator] = None) -> Tensor:
    """Unbiased estimate of ||d z_out / d z_in||_F^2 / numel(z_in), differentiable in the parameters.

    For Gaussian probes v ~ N(0, I), E ||v^T J||^2 = ||J||_F^2. The sum over probes is divided by
    ``probes * z_in.numel()`` (the batch included), the normalisation of the authors' code, so the
    JR paper's loss weights apply unchanged.

    Args:
        z_in: (B, D) the input of the application of f (a tensor that requires grad).
        z_out: (B, D) ``f(z_in)`` with its autograd graph.
        probes: the number of Gaussian probe vectors.
        generator: draws the probes (the global generator when None).

    Returns:
        a scalar float32 tensor with a graph (``create_graph=True``), so that adding it to the loss
        differentiates the VJP with respect to the parameters of f.
    """
    if probes < 1:
        raise ValueError(f"probes = {probes} must be >= 1")
    total = z_out.new_zeros((), dtype=torch.float32)
    for _ in range(probes):
        v = torch.randn(z_out.shape, generator=generator, device=z_out.device, dtype=z_out.dtype)
        (vj,) = torch.autograd.grad(z_out, z_in, v, retain_graph=True, create_graph=True)
        total = total + vj.float().pow(2).sum()
    return total / (probes * z_in.numel())


def spectral_radius(f: Callable[[Tensor], Tensor], z: Tensor, iters: int = 10,
                    generator: Optional[torch.Generator] = None) -> Tensor:
    """Power-method estimate of the spectral radius of J_f(z), one per sample.

    Iterates ``v <- v^T J / ||v^T J||`` (the power method on J^T, which has the eigenvalues of J)
    with one VJP per iteration through a single application of f at ``z``; the estimate is the
    last growth factor ``||v^T J|| / ||v||``. Values near or above 1 mean the fixed point is about
    to lose its stability, which researchers watch during training. For a dominant pair of complex
    eigenvalues the factor oscillates around |lambda|, so it is an estimate, not a bound.

    Args:
        f: the map, (B, D) -> (B, D), block-diagonal over the batch.
        z: (B, D) the point (e.g. the equilibrium z*); not modified.
        iters: the number of power iterations (VJPs).
        generator: draws the start vector.

    Returns:
        (B,) float32 estimates, without a graph.
    """
    if iters < 1:
        raise ValueError(f"iters = {iters} must be >= 1")
    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        z_out = f(z_in)
        v = torch.randn(z.shape, generator=generator, device=z.device, dtype=z_out.dtype)
        v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (v.dim() - 1)))
        growth = z.new_zeros(z.shape[0], dtype=torch.float32)
        for _ in range(iters):
            (vj,) = torch.autograd.grad(z_out, z_in, v, retain_graph=True)
            norm = vj.float().flatten(1).norm(dim=1)
            growth = norm / v.float().flatten(1).norm(dim=1).clamp_min(1e-30)
            v = (vj / norm.clamp_min(1e-30).view(-1, *([1] * (vj.dim() - 1))).to(vj.dtype)).detach()
    return growth.detach()


def jacobian_operator_norm(f: Callable[[Tensor], Tensor], z: Tensor, iters: int = 20,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """Power-method estimate of ||J_f(z)||_2 (the largest singular value), one per sample.

    Iterates ``v <- J^T J v / ||J^T J v||``: ``J v`` by the double-VJP trick (the VJP ``u -> J^T u``
    is linear in ``u``, so differentiating ``<J^T u, v>`` in ``u`` gives ``J v``), ``J^T (J v)`` by a
    VJP, all through one application of f at ``z``. The estimate ``||J v|| / ||v||`` is at most the
    norm and approaches it from below: an empirical figure, not a bound (compare
    :func:`spectral_radius`, the largest |eigenvalue|, which can be smaller).

    Args:
        f: the map, (B, D) -> (B, D), block-diagonal over the batch.
        z: (B, D) the point (e.g. the equilibrium z*); not modified.
        iters: power iterations (each: two VJPs and one double-backward).
        generator: draws the start vector.

    Returns:
        (B,) float32 estimates, without a graph.
    """
    if iters < 1:
        raise ValueError(f"iters = {iters} must be >= 1")

    def unit(x: Tensor) -> Tensor:
        return x / x.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *([1] * (x.dim() - 1)))

    with torch.enable_grad():
        z_in = z.detach().requires_grad_(True)
        z_out = f(z_in)
        u = torch.zeros_like(z_out, requires_grad=True)
        (jtu,) = torch.autograd.grad(z_out, z_in, u, create_graph=True)   # J^T u, linear in u
        v = unit(torch.randn(z.shape, generator=generator, device=z.device, dtype=z_out.dtype))
        norm = z.new_zeros(z.shape[0], dtype=torch.float32)
        for _ in range(iters):
            (jv,) = torch.autograd.grad(jtu, u, v, retain_graph=True)
            norm = jv.float().flatten(1).norm(dim=1)
            (jtjv,) = torch.autograd.grad(z_out, z_in, jv.detach(), retain_graph=True)
            v = unit(jtjv.detach())
    return norm.detach()
