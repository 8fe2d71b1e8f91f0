"""The health check of a training run: the signs that a run has gone bad while its loss stays
finite (so the step guard never fires), judged once per epoch on numbers summed over all ranks.

* the implicit backward fell back to the one-step gradient on most equilibrium steps (its adjoint
  solve no longer converges: the gradients are no longer the model's);
* the forward solver ended the epoch far from an equilibrium (mean relative residual of the
  epoch's last quarter of equilibrium steps above ``max_residual``);
* the epoch's mean training loss rose far above the lowest epoch mean seen so far (kept across
  resumes in the checkpoint);
* the task's own sign (:meth:`mdeq.core.trainer.Task.health_problem`), judged on epochs with
  equilibrium steps: for classification, a held-out accuracy at chance level with a training
  loss no better than a uniform guess.

An unhealthy epoch logs a warning with the numbers and the settings to change; with
``TRAIN.STOP_ON_UNHEALTHY`` the trainer then stops as on divergence (exit status 3) before that
epoch's state overwrites the last checkpoint.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ..modules import EquilibriumInfo
from ..utils.distributed import all_reduce_sum

ADVICE = ("lower TRAIN.LR (or resume from the last healthy checkpoint with a lower one), set TRAIN.CLIP, "
          "raise MODEL.F_THRES / MODEL.B_THRES, or add Jacobian regularisation (MODEL.JAC_LOSS_WEIGHT)")


class HealthMonitor:
    """Collects per-step solver statistics and judges each epoch.

    Args:
        max_fallback: the largest healthy share of equilibrium steps whose backward fell back.
        max_residual: the largest healthy mean relative forward residual at the end of an epoch.
        loss_rise: an epoch mean loss above ``loss_rise`` x the lowest earlier epoch mean (and
            higher than it by at least ``min_loss_gap``) is unhealthy.
    """

    def __init__(self, max_fallback: float = 0.5, max_residual: float = 0.1, loss_rise: float = 2.0,
                 min_loss_gap: float = 0.25) -> None:
        self.max_fallback, self.max_residual = float(max_fallback), float(max_residual)
        self.loss_rise, self.min_loss_gap = float(loss_rise), float(min_loss_gap)
        self.best_loss = math.inf
        self._residuals: List[float] = []
        self._fallbacks = 0
        self._backwards = 0

    # ------------------------------------------------------------------ per step
    def observe(self, info: EquilibriumInfo) -> None:
        """Record one training step's solver statistics (equilibrium steps only)."""
        if info.mode != "equilibrium":
            return
        if info.f_rel is not None:
            self._residuals.append(float(info.f_rel))
        if info.b_fallback is not None:
            self._backwards += 1
            self._fallbacks += int(bool(info.b_fallback))

    # ------------------------------------------------------------------ per epoch
    def end_epoch(self, mean_loss: float, device: torch.device) -> Tuple[List[str], str]:
        """(the problems of the epoch that ends, empty when healthy; its solver numbers as text), the
        same on every rank; resets the counters."""
        tail = self._residuals[-max(1, len(self._residuals) // 4):] if self._residuals else []
        sums = all_reduce_sum(torch.tensor([float(self._fallbacks), float(self._backwards), float(sum(tail)),
                                            float(len(tail))], dtype=torch.float64, device=device))
        fallbacks, backwards, res_sum, res_n = (float(v) for v in sums)
        self._residuals, self._fallbacks, self._backwards = [], 0, 0
        numbers = "no equilibrium steps" if not res_n else (
            f"backward fallbacks {fallbacks / max(backwards, 1):.0%} of {int(backwards)} equilibrium steps, "
            f"final forward relative residual {res_sum / res_n:.3g}")
        problems = []
        if backwards and fallbacks / backwards > self.max_fallback:
            problems.append(f"the implicit backward fell back to the one-step gradient on {fallbacks / backwards:.0%} "
                            f"of {int(backwards)} equilibrium steps (healthy: at most {self.max_fallback:.0%})")
        if res_n and res_sum / res_n > self.max_residual:
            problems.append(f"the forward solver ended the epoch at a mean relative residual of {res_sum / res_n:.3g} "
                            f"(healthy: at most {self.max_residual:g})")
        if math.isfinite(mean_loss):
            ref = self.best_loss
            if math.isfinite(ref) and mean_loss > self.loss_rise * ref and mean_loss - ref > self.min_loss_gap:
                problems.append(f"the mean training loss rose to {mean_loss:.4g}, {mean_loss / ref:.1f}x the lowest "
                                f"epoch mean so far ({ref:.4g})")
            self.best_loss = min(self.best_loss, mean_loss)
        return problems, numbers

    @property
    def equilibrium_steps(self) -> int:
        """Equilibrium steps observed in the current epoch (on this rank)."""
        return len(self._residuals)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> Dict[str, float]:
        return {"best_loss": float(self.best_loss)}

    def load_state_dict(self, state: Optional[Mapping[str, Any]]) -> None:
        self.best_loss = float((state or {}).get("best_loss", math.inf))
