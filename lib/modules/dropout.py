"""Variational (locked) dropout for equilibrium models.

One channel mask per sample is drawn at the start of each equilibrium solve and shared by every
iteration of f and by every pixel, so that f stays one fixed function during the solve.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

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


class CallState:
    """What a module's function depends on besides its tensors, as it is when recorded: each submodule's
    train/eval flag and each :class:`VariationalDropout2d`'s mask (see :func:`call_state_restored`)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.flags: List[Tuple[nn.Module, bool]] = [(m, m.training) for m in modules]
        self.masks: List[Tuple[VariationalDropout2d, Optional[torch.Tensor]]] = [
            (m, m.mask) for m in modules if isinstance(m, VariationalDropout2d)]

    def holds(self) -> bool:
        """Whether the modules are as recorded now."""
        return all(m.training is t for m, t in self.flags) and all(m.mask is k for m, k in self.masks)

    def apply(self) -> None:
        for m, training in self.flags:
            m.training = training
        for m, mask in self.masks:
            m.mask = mask


def call_state(module: nn.Module) -> CallState:
    """The train/eval flag of every submodule of ``module`` and the mask of every
    :class:`VariationalDropout2d` in it, as they are now (what :func:`call_state_restored` sets again)."""
    return CallState(list(module.modules()))


@contextlib.contextmanager
def call_state_restored(state: CallState) -> Iterator[None]:
    """Within the block, the modules of ``state`` (from :func:`call_state`) have the flags and dropout masks
    recorded there, and afterwards those they had: a function of one solve (f of an MDEQ call) stays that
    function when it is evaluated later, after ``model.eval()`` or after another call drew new masks (the
    reversible backward evaluates f again)."""
    if state.holds():
        yield          # nothing changed since the record (every evaluation within the solve)
        return
    current = CallState([m for m, _ in state.flags])
    try:
        state.apply()
        yield
    finally:
        current.apply()
