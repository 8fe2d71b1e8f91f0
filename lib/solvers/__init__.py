"""Fixed-point solvers for equilibrium models, and their registry (:mod:`.registry`):
``register_solver(name, fn, history_rows=...)``, ``get_solver(name)``, ``solver_names()``.

Every solver is called as ``solver(f, z0, threshold, eps=..., stop_mode=..., **options)`` on
flattened (B, D) states and returns a :class:`~mdeq.solvers.residuals.SolverResult`. Each solver's
signature names the options it takes and nothing else, so a misspelt option is a TypeError;
:func:`solver_options` picks a solver's own options out of a model's settings.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping

from ..config.validation import register_choices
from .anderson import anderson
from .anderson import history_reads as anderson_history_reads
from .anderson import history_rows as anderson_history_rows
from .broyden import broyden
from .broyden import history_reads as broyden_history_reads
from .broyden import history_rows as broyden_history_rows
from .fixed_point import fixed_point
from .registry import (SolverEntry, SolverFn, get_solver, history_reads, history_rows, register_solver,
                       registry_entry, resolve_solver, solver_names)
from .residuals import (SOLVER_KEYS, ExitRule, FixedPointFnFactory, IterateTracker, SampleExit, SolverResult,
                        solver_memory)
from .reversible import ReversibleResult, check_beta, reversible
from .workspace import SolverWorkspace

register_solver("broyden", broyden, history_rows=broyden_history_rows, history_reads=broyden_history_reads)
register_solver("anderson", anderson, history_rows=anderson_history_rows, history_reads=anderson_history_reads)
register_solver("fixed_point", fixed_point)
register_solver("reversible", reversible)
for _key in ("MODEL.F_SOLVER", "MODEL.B_SOLVER"):
    register_choices(_key, solver_names)

# f, z0 and threshold are the call itself, not options
_POSITIONAL = ("f", "z0", "threshold")


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


__all__ = ["anderson", "broyden", "fixed_point", "reversible", "ReversibleResult", "check_beta", "get_solver",
           "history_reads", "history_rows", "register_solver", "registry_entry",
           "resolve_solver", "solver_names", "solver_options", "option_names", "SolverEntry", "SOLVER_KEYS",
           "SolverFn", "SolverResult", "IterateTracker", "SolverWorkspace", "solver_memory", "SampleExit", "ExitRule",
           "FixedPointFnFactory"]
