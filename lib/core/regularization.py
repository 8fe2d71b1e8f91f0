"""Jacobian regularisation in the training loop (Bai, Koltun & Kolter, ICML 2021).

The equilibrium layer computes the Hutchinson estimate of ||J_f(z*)||_F^2 when it is called with
``jac_loss=True`` and returns it in its info (see :class:`mdeq.modules.EquilibriumLayer`); this
module decides on which steps to ask for it and with which weight it enters the loss::

    reg = JacobianRegularizer.from_cfg(cfg)
    logits, info = model(images, train_step=step, jac_loss=reg.active(step), return_info=True)
    loss = reg.add(criterion(logits, target), info, epoch)
"""
from __future__ import annotations

from typing import Optional

import torch

from ..config.validation import check_jac_loss_freq
from ..modules import EquilibriumInfo

Tensor = torch.Tensor

_MASK64 = (1 << 64) - 1


def _unit_hash(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step) (splitmix64), so that every DDP
    rank and a resumed run make the same choice without touching a random generator's state."""
    x = (int(seed) * 0x9E3779B97F4A7C15 + int(step) + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    x ^= x >> 31
    return (x >> 11) / float(1 << 53)


class JacobianRegularizer:
    """When and how strongly the Jacobian term enters the loss.

    Args:
        weight: MODEL.JAC_LOSS_WEIGHT (0: off).
        freq: MODEL.JAC_LOSS_FREQ: a whole number p >= 1 applies the term on every p-th step; a
            number in (0, 1) on that fraction of the steps, chosen by a hash of (seed, step).
        incremental: MODEL.JAC_INCREMENTAL, added to the weight once per epoch.
        seed: SEED.
    """

    def __init__(self, weight: float = 0.0, freq: float = 1.0, incremental: float = 0.0, seed: int = 0) -> None:
        if weight < 0 or incremental < 0:
            raise ValueError(f"JAC_LOSS_WEIGHT = {weight} and JAC_INCREMENTAL = {incremental} must be >= 0")
        check_jac_loss_freq(freq)
        self.base_weight, self.freq, self.incremental, self.seed = float(weight), float(freq), float(incremental), seed

    @classmethod
    def from_cfg(cls, cfg) -> "JacobianRegularizer":
        m = cfg.MODEL
        return cls(m.JAC_LOSS_WEIGHT, m.JAC_LOSS_FREQ, m.JAC_INCREMENTAL, cfg.SEED)

    @property
    def enabled(self) -> bool:
        return self.base_weight > 0.0 or self.incremental > 0.0

    def active(self, step: int) -> bool:
        """Whether to ask the model for the Jacobian term on global step ``step``."""
        if not self.enabled:
            return False
        if self.freq >= 1.0:
            return step % int(self.freq) == 0
        return _unit_hash(self.seed, step) < self.freq

    def weight(self, epoch: int) -> float:
        """The weight in epoch ``epoch`` (0-based): JAC_LOSS_WEIGHT + JAC_INCREMENTAL * epoch."""
        return self.base_weight + self.incremental * max(0, int(epoch))

    def add(self, loss: Tensor, info: Optional[EquilibriumInfo], epoch: int) -> Tensor:
        """``loss + weight(epoch) * info.jac_loss`` when the call computed the term, else ``loss``."""
        term = info.jac_loss if info is not None else None
        if term is None or not self.enabled:
            return loss
        return loss + self.weight(epoch) * term.to(loss.dtype)
