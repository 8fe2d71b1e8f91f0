"""The solvers by name: the one list of solver names, and what each solver declares about itself.

A solver is registered once, with its name, the size of its history buffer and how much of it a
solve must read::

    register_solver("broyden", broyden, history_rows=broyden_rows, history_reads=broyden_reads)

Everything that names solvers asks this registry: ``MODEL.F_SOLVER`` / ``B_SOLVER`` are checked
against :func:`solver_names` when a config is loaded (:func:`mdeq.config.validation.register_choices`),
the model looks its solvers up with :func:`get_solver`, the benchmark sizes their history with
:func:`history_rows` and bounds their own time with :func:`history_reads`, and the tools'
``--solvers`` lists come from it. A user's solver registered before the config is loaded is a valid
``MODEL.F_SOLVER``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from ..config.validation import ConfigError
from .residuals import SolverResult

SolverFn = Callable[..., SolverResult]
#: (threshold, memory) -> the (B, D) rows of a solve's history buffer
HistoryRows = Callable[[int, int], int]


def _no_history(threshold: int, memory: int) -> int:
    return 0


@dataclass(frozen=True)
class SolverEntry:
    """A registered solver: its ``name``, the function ``fn``, ``history_rows(threshold, memory)``,
    the (B, D) rows of the history buffer one solve keeps, and ``history_reads(threshold, memory)``,
    the history rows one solve must read at the least, summed over its steps (both 0 for a solver
    without history)."""

    name: str
    fn: SolverFn
    history_rows: HistoryRows = _no_history
    history_reads: HistoryRows = _no_history


_REGISTRY: Dict[str, SolverEntry] = {}


def register_solver(name: str, fn: SolverFn, history_rows: Optional[HistoryRows] = None,
                    replace: bool = False, history_reads: Optional[HistoryRows] = None) -> SolverFn:
    """Make ``fn`` the solver called ``name`` (``solver(f, z0, threshold, eps=..., stop_mode=..., ...)``
    on (B, D) states, returning a :class:`SolverResult`); returns ``fn``.

    Args:
        history_rows: ``(threshold, memory) -> rows``, the (B, D) rows of its history buffer (what the
            benchmark reports as solver memory); ``None``: it keeps no history.
        history_reads: ``(threshold, memory) -> rows``, the (B, D) history rows a solve must read at the
            least, over all its steps (the benchmark's history floor); ``None``: none.
        replace: allow re-registering a taken name (otherwise a ValueError naming it).
    """
    if not name or not isinstance(name, str):
        raise ValueError(f"a solver name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"solver {name!r}: {fn!r} is not callable")
    if name in _REGISTRY and not replace and _REGISTRY[name].fn is not fn:
        raise ValueError(f"solver {name!r} is already registered ({_REGISTRY[name].fn!r}); pass replace=True")
    _REGISTRY[name] = SolverEntry(name, fn, history_rows or _no_history, history_reads or _no_history)
    return fn


def solver_names() -> Tuple[str, ...]:
    """The registered solvers' names, in the order they were registered."""
    return tuple(_REGISTRY)


def get_solver(name: str, key: str = "") -> SolverFn:
    """The solver registered as ``name``.

    Raises:
        ValueError: an unknown name, naming the choices; a :class:`~mdeq.config.ConfigError` that also
            names the config ``key`` (e.g. ``'MODEL.F_SOLVER'``) when one is given.
    """
    if name in _REGISTRY:
        return _REGISTRY[name].fn
    if key:
        raise ConfigError(f"{key} = {name!r}; choose one of {solver_names()}")
    raise ValueError(f"unknown solver {name!r}; choose one of {solver_names()}")


def resolve_solver(solver: str | SolverFn) -> SolverFn:
    """A solver given by name (see :func:`get_solver`) or as a callable (returned as is)."""
    return get_solver(solver) if isinstance(solver, str) else solver


def registry_entry(solver: str | SolverFn) -> Optional[SolverEntry]:
    """The entry of a solver given by name or as a callable (a wrapper that sets ``__wrapped__``, like
    the benchmark's timer, is its wrapped solver's); ``None`` for an unregistered callable."""
    if isinstance(solver, str):
        return _REGISTRY.get(solver)
    fn = inspect.unwrap(solver)
    return next((e for e in _REGISTRY.values() if e.fn is fn or e.fn is solver), None)


def history_rows(solver: str | SolverFn, threshold: int, memory: int) -> int:
    """(B, D) rows of the history buffer of one solve by ``solver`` (0: none, or not registered)."""
    entry = registry_entry(solver)
    return entry.history_rows(int(threshold), int(memory)) if entry else 0


def history_reads(solver: str | SolverFn, threshold: int, memory: int) -> int:
    """(B, D) history rows one solve by ``solver`` must read at the least (0: none, or not registered)."""
    entry = registry_entry(solver)
    return entry.history_reads(int(threshold), int(memory)) if entry else 0
