"""Variational (locked) dropout for equilibrium models.

One channel mask per sample is drawn at the start of each equilibrium solve and shared by every
iteration of f and by every pixel, so that f stays one fixed function during the solve.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class VariationalDropout2d(nn.Module):
    """Multiply (N, C, H, W) features by a fixed (N, C, 1, 1) mask scaled by 1/(1-p).

    Call :meth:`reset_mask` once per solve (before the first application of f).
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout rate must lie in [0, 1), got {p}")
        self.p = p
        self.mask: torch.Tensor | None = None

    def reset_mask(self, like: torch.Tensor) -> None:
        """Draw a new mask for features shaped like ``like`` (N, C, H, W)."""
        if self.p == 0.0 or not self.training:
            self.mask = None
            return
        keep = torch.empty(like.shape[0], like.shape[1], 1, 1, device=like.device, dtype=like.dtype)
        self.mask = keep.bernoulli_(1.0 - self.p) / (1.0 - self.p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if self.mask is None or self.mask.shape[:2] != x.shape[:2]:
            raise RuntimeError("VariationalDropout2d: call reset_mask() before the solve "
                               f"(mask {None if self.mask is None else tuple(self.mask.shape)}, input {tuple(x.shape)})")
        return x * self.mask

    def extra_repr(self) -> str:
        return f"p={self.p}"
