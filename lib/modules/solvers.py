"""The registry of fixed-point solvers: ``get_solver(name)`` -> callable with one interface.

Every solver is called as ``solver(f, z0, threshold, eps=..., stop_mode=..., **options)`` on
flattened (B, D) states and returns a :class:`~mdeq.modules.residuals.SolverResult`.
"""
from __future__ import annotations

from typing import Callable, Dict

from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point
from .residuals import SolverResult

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
