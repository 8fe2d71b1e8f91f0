"""The divergence guard: a training step whose loss or gradient is not finite, or whose forward
solver hit its divergence guard, does not update the weights; ``TRAIN.MAX_BAD_STEPS`` such steps
in a row stop the run (:class:`TrainingDiverged`).

Every rank reaches the same decision (the flags are all-reduced before anyone calls backward, and
the gradient norm is taken after DDP's all-reduce), so under DDP a bad step on one rank is skipped
by all of them: no rank runs backward for it, DDP's reducer sees no half-finished reduction, and
the replicas stay identical.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
import torch.nn as nn

from ..modules import EquilibriumInfo
from ..utils.distributed import all_reduce_sum, is_initialized
from .state import TrainState

logger = logging.getLogger(__name__)

DIVERGENCE_ADVICE = ("Lower TRAIN.LR, set TRAIN.CLIP, raise TRAIN.PRETRAIN_STEPS or MODEL.F_THRES, "
                     "or raise TRAIN.MAX_BAD_STEPS.")


class TrainingDiverged(RuntimeError):
    """Too many consecutive skipped steps, or an unhealthy run with TRAIN.STOP_ON_UNHEALTHY."""


class StepGuard:
    """Decides whether a training step may update the weights, and stops a diverging run.

    Args:
        state: the loop's :class:`TrainState` (``bad_steps`` and ``skipped_steps`` are updated).
        max_bad_steps: ``TRAIN.MAX_BAD_STEPS``; that many consecutive skipped steps raise
            :class:`TrainingDiverged`.
    """

    WHAT = {"loss": "non-finite loss", "gradient": "non-finite gradient",
            "solver": "forward solver divergence (f_diverged)"}

    def __init__(self, state: TrainState, max_bad_steps: int) -> None:
        self.state = state
        self.max_bad_steps = max(1, int(max_bad_steps))

    @staticmethod
    def forward_problem(loss: torch.Tensor, info: EquilibriumInfo) -> Optional[str]:
        """``'loss'`` (not finite) or ``'solver'`` (``info.f_diverged``) on any rank, else None (a collective)."""
        bad_loss = not bool(torch.isfinite(loss.detach()).all().item())
        bad_solver = info.diverged
        if is_initialized():
            flags = all_reduce_sum(torch.tensor([float(bad_loss), float(bad_solver)], dtype=torch.float64,
                                                device=loss.device))
            bad_loss, bad_solver = bool(flags[0] > 0), bool(flags[1] > 0)
        return "loss" if bad_loss else ("solver" if bad_solver else None)

    @staticmethod
    def gradient_problem(grad_norm: Optional[float]) -> Optional[str]:
        """``'gradient'`` when the (all-reduced) gradient norm is not finite."""
        return "gradient" if grad_norm is not None and not math.isfinite(grad_norm) else None

    def good(self) -> None:
        """A step that updated the weights: the run of bad steps ends."""
        self.state.bad_steps = 0

    def bad(self, reason: str, epoch: int, step: int, loss: Any, grad_norm: Optional[float],
            info: EquilibriumInfo) -> None:
        """Count and log a skipped step (``info``: its equilibrium's statistics); raise
        :class:`TrainingDiverged` at the limit."""
        self.state.bad_steps += 1
        self.state.skipped_steps += 1
        what = self.WHAT.get(reason, reason)
        loss_v = float(loss.detach().float().mean()) if isinstance(loss, torch.Tensor) else loss
        logger.warning("epoch %d step %d: %s (loss %s, grad norm %s), update skipped (%d in a row, limit "
                       "TRAIN.MAX_BAD_STEPS=%d); solver: %s", epoch, step, what,
                       "n/a" if loss_v is None else f"{loss_v:.4g}",
                       "n/a" if grad_norm is None else f"{grad_norm:.4g}", self.state.bad_steps,
                       self.max_bad_steps, info.describe())
        if self.state.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {self.state.bad_steps} consecutive steps with a {what} (epoch {epoch}, "
                f"global step {step}, phase {info.mode}; last solver stats: {info.describe()}). "
                f"{DIVERGENCE_ADVICE}")


def grad_norm_of(model: nn.Module, clip: float) -> float:
    """The total gradient norm (clipped to ``clip`` when ``clip > 0``); inf / nan when not finite."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf")))
