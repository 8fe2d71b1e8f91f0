"""Reading the model's ``solver_stats`` (what the last forward / backward solve did) for logs,
progress bars, TensorBoard and the step guard."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn

from ..solvers import SOLVER_KEYS
from ..utils.distributed import unwrap

#: the numeric statistics worth logging, in the order they are shown: the solvers' and the Jacobian
#: regularisation term that the model records beside them
LOGGED_KEYS = SOLVER_KEYS + ("jac_loss",)


def to_float(v: Any) -> Optional[float]:
    """A number, a bool or a tensor (its mean) as a float; None for anything else or an empty tensor."""
    if isinstance(v, torch.Tensor):
        if not v.numel():
            return None
        v = v.detach().float().mean().item()
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def solver_stats(model: nn.Module) -> Dict[str, Any]:
    """A copy of the (possibly DDP-wrapped) model's ``solver_stats``."""
    return dict(getattr(unwrap(model), "solver_stats", {}) or {})


def solver_scalars(stats: Mapping[str, Any]) -> Dict[str, float]:
    """``{key: float}`` for the :data:`LOGGED_KEYS` present in ``stats``."""
    out = {}
    for k in LOGGED_KEYS:
        v = to_float(stats.get(k))
        if v is not None:
            out[k] = v
    return out


def solver_diverged(stats: Mapping[str, Any]) -> bool:
    """Whether the forward solver reported that it hit its divergence guard (``f_diverged``)."""
    v = stats.get("f_diverged")
    if isinstance(v, torch.Tensor):
        return bool(v.detach().any().item()) if v.numel() else False
    return bool(v)


def format_solver_stats(stats: Mapping[str, Any]) -> str:
    """``mode=... f_steps=... f_rel=... b_rel=... b_fallback=...`` for the logs."""
    parts = [f"mode={stats.get('mode', '?')}"]
    parts += [f"{k}={v:.4g}" for k, v in solver_scalars(stats).items()]
    if "f_diverged" in stats:
        parts.append(f"f_diverged={solver_diverged(stats)}")
    return " ".join(parts)
