"""Weight normalisation (Salimans & Kingma, 2016) for convolutions inside f_theta.

The weight is ``w = g * v / ||v||`` with the norm taken over every dimension but the output
channel; ``g`` has shape (C_out, 1, 1, 1). The parameters are named ``weight_g`` and ``weight_v``
as in the original MDEQ checkpoints, and ``w`` is recomputed from them on every forward, so an
optimizer step on ``g`` or ``v`` is seen at once.

One model call evaluates f many times with the same weights (every solver step, every unrolled
layer, every phantom step). :func:`weights_fixed` computes each ``w`` once for such a call, as the
original's ``_reset`` does, and the applications that autograd records share it: their weight
gradients add up at ``w`` and flow back through the normalisation once.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReparamConv2d(nn.Module):
    """A bias-optional ``Conv2d`` whose weight is a function of parameters (:attr:`weight`, a property
    of the subclass), computed once per model call inside :func:`weights_fixed`.

    Shapes: input (N, C_in, H, W) -> output (N, C_out, H', W').
    """

    def __init__(self, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.stride = stride
        self.padding = padding
        self.bias: Optional[nn.Parameter] = None
        self.fixed_weight: Optional[torch.Tensor] = None   # set by weights_fixed

    @property
    def weight(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fixed_weight if self.fixed_weight is not None else self.weight
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class WeightNormConv2d(ReparamConv2d):
    """A ``Conv2d`` whose weight is parametrised as ``weight_g * weight_v / ||weight_v||``.

    Shapes: input (N, C_in, H, W) -> output (N, C_out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = False) -> None:
        super().__init__(stride, padding)
        self.weight_v = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.weight_g = nn.Parameter(torch.empty(out_channels, 1, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight_v, a=5 ** 0.5)
        self.reset_g()

    @torch.no_grad()
    def reset_g(self) -> None:
        """Set ``g = ||v||`` so that the effective weight equals ``v``."""
        self.weight_g.copy_(self.weight_v.flatten(1).norm(dim=1).view_as(self.weight_g))

    @property
    def weight(self) -> torch.Tensor:
        v = self.weight_v
        return v * (self.weight_g / v.flatten(1).norm(dim=1).view_as(self.weight_g))

    def extra_repr(self) -> str:
        out_c, in_c, k, _ = self.weight_v.shape
        return f"{in_c}, {out_c}, kernel_size={k}, stride={self.stride}, padding={self.padding}, weight_norm=True"


@contextlib.contextmanager
def weights_fixed(module: nn.Module) -> Iterator[None]:
    """Within the block, every :class:`ReparamConv2d` (e.g. :class:`WeightNormConv2d`) in ``module`` uses one ``w`` computed on entry
    (with autograd if it is on there). The graphs recorded inside keep that ``w``: a backward pass
    after the block (the implicit backward's adjoint solve) still reaches ``g`` and ``v``."""
    # not those that an outer block has fixed
    convs: List[ReparamConv2d] = [m for m in module.modules()
                                  if isinstance(m, ReparamConv2d) and m.fixed_weight is None]
    for m in convs:
        m.fixed_weight = m.weight
    try:
        yield
    finally:
        for m in convs:
            m.fixed_weight = None


def fixed_weights(module: nn.Module) -> List[Tuple[ReparamConv2d, torch.Tensor]]:
    """The ``(conv, w)`` pairs of the :class:`ReparamConv2d` in ``module`` whose weight a
    :func:`weights_fixed` block has fixed now (what :func:`weights_restored` sets again later)."""
    return [(m, m.fixed_weight) for m in module.modules()
            if isinstance(m, ReparamConv2d) and m.fixed_weight is not None]


@contextlib.contextmanager
def weights_restored(fixed: Sequence[Tuple[ReparamConv2d, torch.Tensor]]) -> Iterator[None]:
    """Within the block, each conv of ``fixed`` (from :func:`fixed_weights`) uses its ``w`` again, unless a
    block has fixed it already: a function of the call's weights (f of an MDEQ call) stays that function
    when it is evaluated after the call (the reversible backward evaluates f again)."""
    unset = [(m, w) for m, w in fixed if m.fixed_weight is None]
    for m, w in unset:
        m.fixed_weight = w
    try:
        yield
    finally:
        for m, _ in unset:
            m.fixed_weight = None


def conv2d(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, bias: bool = False,
           wnorm: bool = False) -> nn.Module:
    """A bias-free, 'same'-padded convolution, weight-normalised when ``wnorm``."""
    padding = kernel_size // 2
    if wnorm:
        return WeightNormConv2d(in_channels, out_channels, kernel_size, stride, padding, bias)
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=bias)
