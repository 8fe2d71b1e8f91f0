"""The reversible fixed-point iteration of Reversible Deep Equilibrium Models (McCallum, Arora &
Foster, 2025, arXiv 2509.12917): two coupled states, both starting at z0, relaxed by beta,

    y_{n+1} = (1 - beta) y_n + beta f(z_n)
    z_{n+1} = (1 - beta) z_n + beta f(y_{n+1}),

which can be run backwards exactly (in exact arithmetic) from (y_N, z_N):

    z_n = (z_{n+1} - beta f(y_{n+1})) / (1 - beta)
    y_n = (y_{n+1} - beta f(z_n)) / (1 - beta),

so a backward pass needs only the final states (:mod:`mdeq.modules.reversible`). Each step evaluates
f twice. The solve stops after ``threshold`` steps, or earlier once the residual of z_n (see
``stop_mode``) is under ``eps`` for every sample: the f(z_n) of that test is the next step's first
evaluation, so the test costs nothing while the iteration goes on. The returned ``z`` is z_N itself
(never a best iterate: the backward needs the states the iteration reached) and ``fz`` is f(z_N),
one more evaluation, from which the final residual is taken.

Run backwards, the inverse divides the rounding of each step by 1 - beta and passes it through f's
Jacobian, so in float32 the rebuilt states drift from the forward's within a few steps (docs/reversible.md
measures it). ``float64_states`` keeps y and z in float64 while f runs in z0's dtype: f then sees the
same float32 inputs in the backward as in the forward (its outputs are the same), and only float64
rounding is amplified.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .residuals import FixedPointFn, SolverResult

Tensor = torch.Tensor
_TINY = 1e-12


def check_beta(beta: float, key: str = "beta") -> float:
    """``beta`` as a float when it is an allowed relaxation of the reversible iteration: in (0, 2) and not 1
    (at 1 the step cannot be inverted, it divides by 1 - beta). Otherwise a ValueError naming ``key``."""
    beta = float(beta)
    if not 0.0 < beta < 2.0 or beta == 1.0:
        raise ValueError(f"{key} = {beta!r}: the reversible iteration's relaxation must lie in (0, 2) and differ "
                         "from 1 (its inverse divides by 1 - beta)")
    return beta


@dataclass
class ReversibleResult(SolverResult):
    """A :class:`SolverResult` of :func:`reversible` (``z`` is z_N, ``steps`` the coupled steps), with

    Attributes:
        y: (B, D) y_N, the other final state (the backward pass starts from (y_N, z_N)), in the state dtype.
        z_state: (B, D) z_N in the state dtype (``z`` is it in z0's dtype).
        evaluations: evaluations of f made (2 per step, + 1 for f(z_N)).
        beta: the relaxation used.
    """

    y: Optional[Tensor] = None
    z_state: Optional[Tensor] = None
    evaluations: int = 0
    beta: float = 0.8


def _residuals(z: Tensor, fz: Tensor, stop_mode: str) -> Tensor:
    """(B,) the per-sample residual of ``z`` given ``fz = f(z)``: relative or absolute."""
    abs_b = (fz - z).float().norm(dim=1)
    return abs_b / (fz.float().norm(dim=1) + _TINY) if stop_mode == "rel" else abs_b


@torch.no_grad()
def reversible(f: FixedPointFn, z0: Tensor, threshold: int, eps: float = 1e-3, stop_mode: str = "rel",
               rev_beta: float = 0.8, float64_states: bool = False) -> ReversibleResult:
    """Run at most ``threshold`` coupled steps from y_0 = z_0 = ``z0`` (B, D); see the module docstring.

    Args:
        f: maps (B, D) -> (B, D).
        threshold: N, the largest number of coupled steps (2 evaluations of f each).
        eps: stop once every sample's residual of z_n is under it (0: run all N steps).
        stop_mode: ``'rel'`` (||f(z) - z|| / ||f(z)||) or ``'abs'`` (||f(z) - z||), per sample.
        rev_beta: beta, the relaxation, in (0, 2), not 1 (named apart from Anderson's mixing ``beta``, so
            that a layer holding both passes each solver its own).
        float64_states: keep y and z in float64 (f runs in z0's dtype); see the module docstring.

    Returns:
        :class:`ReversibleResult`: ``z`` = z_N, ``y`` = y_N, ``fz`` = f(z_N), the batch residuals of z_N,
        ``trace`` / ``abs_trace`` the batch residuals of z_1 ... z_n.
    """
    if stop_mode not in ("rel", "abs"):
        raise ValueError(f"stop_mode must be 'rel' or 'abs', got {stop_mode!r}")
    beta = check_beta(rev_beta, "rev_beta")
    if int(threshold) < 1:
        raise ValueError(f"reversible: threshold (coupled steps) = {threshold} must be >= 1")
    f_dtype = z0.dtype
    state_dtype = torch.float64 if float64_states else f_dtype
    y = z = z0.to(state_dtype)
    fz = f(z.to(f_dtype)).to(state_dtype)
    evaluations, steps = 1, 0
    trace, abs_trace = [], []
    while steps < threshold:
        y = (1 - beta) * y + beta * fz
        z = (1 - beta) * z + beta * f(y.to(f_dtype)).to(state_dtype)
        fz = f(z.to(f_dtype)).to(state_dtype)
        evaluations += 2
        steps += 1
        abs_all = (fz - z).float().norm()
        abs_trace.append(float(abs_all))
        trace.append(float(abs_all / (fz.float().norm() + _TINY)))
        if eps > 0 and bool((_residuals(z, fz, stop_mode) < eps).all()):
            break
    finite = bool(torch.isfinite(z).all() and torch.isfinite(y).all())
    converged = bool((_residuals(z, fz, stop_mode) < eps).all()) if eps > 0 else False
    return ReversibleResult(z=z.to(f_dtype), fz=fz.to(f_dtype), steps=steps, abs_residual=abs_trace[-1], rel_residual=trace[-1],
                            trace=trace, abs_trace=abs_trace, converged=converged, diverged=not finite,
                            improved=True, y=y, z_state=z, evaluations=evaluations, beta=beta)
