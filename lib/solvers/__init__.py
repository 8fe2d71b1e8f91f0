"""Fixed-point solvers for equilibrium models, and their registry: ``get_solver(name)``.

Every solver is called as ``solver(f, z0, threshold, eps=..., stop_mode=..., **options)`` on
flattened (B, D) states and returns a :class:`~mdeq.solvers.residuals.SolverResult`. Each solver's
signature names the options it takes and nothing else, so a misspelt option is a TypeError;
:func:`solver_options` picks a solver's own options out of a model's settings.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping

from .anderson import anderson
from .broyden import broyden
from .fixed_point import fixed_point
from .residuals import SOLVER_KEYS, IterateTracker, SolverResult, solver_memory
from .workspace import SolverWorkspace

SolverFn = Callable[..., SolverResult]

SOLVERS: Dict[str, SolverFn] = {
    "broyden": broyden,
    "anderson": anderson,
    "fixed_point": fixed_point,
}

# f, z0 and threshold are the call itself, not options
_POSITIONAL = ("f", "z0", "threshold")


def get_solver(name: str) -> SolverFn:
    """Look a solver up by name ('broyden', 'anderson' or 'fixed_point')."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}") from None


def resolve_solver(solver: str | SolverFn) -> SolverFn:
    """A solver given by name (see :func:`get_solver`) or as a callable (returned as is)."""
    return get_solver(solver) if isinstance(solver, str) else solver


def option_names(solver: SolverFn) -> tuple:
    """The keyword options ``solver`` takes (``eps``, ``stop_mode``, ``memory``, ...).

    A wrapper (e.g. a timing one) that sets ``__wrapped__`` to the solver it calls reports the
    wrapped solver's options, as :func:`inspect.signature` follows ``__wrapped__``.
    """
    params = inspect.signature(solver).parameters.values()
    return tuple(p.name for p in params if p.name not in _POSITIONAL
                 and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def solver_options(solver: SolverFn, settings: Mapping[str, Any]) -> Dict[str, Any]:
    """The entries of ``settings`` that ``solver`` takes, so that a model holding the settings of
    every solver (Anderson's ``beta`` and ``lam``, Broyden's ``workspace``, ...) passes each one only
    its own options."""
    names = option_names(solver)
    return {k: v for k, v in settings.items() if k in names}


__all__ = ["anderson", "broyden", "fixed_point", "get_solver", "resolve_solver", "solver_options", "option_names",
           "SOLVERS", "SOLVER_KEYS", "SolverFn", "SolverResult", "IterateTracker", "SolverWorkspace", "solver_memory"]
