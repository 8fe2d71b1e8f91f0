"""Residual traces of the forward solve, overall and per resolution stream (the paper's Figures 6, 7).

The solvers are not changed: f is wrapped so that every evaluation records the residual of the
point it is evaluated at, split by stream with :attr:`EquilibriumProblem.shapes`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch

from ..solvers import get_solver

Tensor = torch.Tensor


@dataclass
class StreamRecorder:
    """Wraps f: (B, D) -> (B, D) and records, per evaluation, the relative residual
    ``||f(z) - z|| / ||f(z)||`` over the whole batch and for each stream's slice of z.

    Args:
        f: the equilibrium map on flattened states.
        sizes: the number of entries of each stream in D (C_i * H_i * W_i), summing to D.
    """

    f: Callable[[Tensor], Tensor]
    sizes: Sequence[int]
    total: List[float] = field(default_factory=list)
    streams: List[List[float]] = field(default_factory=list)   # [evaluation][stream]

    def __call__(self, z: Tensor) -> Tensor:
        fz = self.f(z)
        g = (fz - z).float()
        parts = torch.stack([torch.stack([gi.square().sum(), fi.float().square().sum()])
                             for gi, fi in zip(g.split(list(self.sizes), dim=1), fz.split(list(self.sizes), dim=1))])
        sums = torch.cat([parts, parts.sum(0, keepdim=True)]).sqrt()          # (n_streams + 1, 2)
        rel = (sums[:, 0] / (sums[:, 1] + 1e-12)).tolist()
        self.streams.append(rel[:-1])
        self.total.append(rel[-1])
        return fz


def convergence_traces(model, x: Tensor, solvers: Sequence[str], evals: int) -> Dict[str, Dict[str, list]]:
    """Run each solver for exactly ``evals`` evaluations (tolerance 0) on images x (N, 3, H, W)
    in eval mode; returns per solver ``{"total": [evals], "streams": [evals][n_streams]}``."""
    model.eval()
    out: Dict[str, Dict[str, list]] = {}
    with torch.no_grad():
        inj = model.injection(x)
        for name in solvers:
            problem = model.equilibrium_problem(inj)
            sizes = [int(torch.Size(s).numel()) for s in problem.shapes]
            rec = StreamRecorder(problem.f, sizes)
            solver = get_solver(name)
            solver(rec, problem.z0, evals, **model.solver_kwargs("f", solver, eps=0.0))
            out[name] = {"total": rec.total, "streams": rec.streams,
                         "shapes": [list(s) for s in problem.shapes]}
    return out
