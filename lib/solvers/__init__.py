"""Fixed-point solvers for equilibrium models, and their registry: ``get_solver(name)``.

Every solver is called as ``solver(f, z0, threshold, eps=..., stop_mode=..., **options)`` on
flattened (B, D) states and returns a :class:`~mdeq.solvers.residuals.SolverResult`.
"""
from __future__ import annotations

from typing import Callable, Dict

from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point
from .residuals import IterateTracker, SolverResult, solver_memory
from .workspace import SolverWorkspace

SOLVERS: Dict[str, Callable[..., SolverResult]] = {
    "broyden": broyden,
    "anderson": anderson,
    "fixed_point": fixed_point,
}


def get_solver(name: str) -> Callable[..., SolverResult]:
    """Look a solver up by name ('broyden', 'anderson' or 'fixed_point')."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


__all__ = ["anderson", "broyden", "fixed_point", "get_solver", "SOLVERS", "SolverResult", "IterateTracker",
           "SolverWorkspace", "solver_memory"]
