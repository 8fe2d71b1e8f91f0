"""Parts with a computed Lipschitz constant, for a contractive f (the Lipschitz MDEQ, docs/lipschitz.md).

* :func:`conv_operator_norm`: the operator norm (L2 -> L2) of a convolution *as it runs*, at its input
  resolution, with its stride and zero padding, by power iteration on ``A^T A`` (``conv2d`` then its
  adjoint ``conv_transpose2d``). Not the spectral norm of the reshaped (C_out, C_in k k) kernel matrix,
  which is a different number (it can be smaller than the operator norm).
* :class:`SpectralCapConv2d`: a convolution whose weight is ``W * min(1, cap / sigma(W))``, ``W`` the
  weight-normalised (or plain) weight and ``sigma`` the operator norm estimated from a persistent
  power-iteration vector (one step per training call, as ``torch.nn.utils.spectral_norm`` does for a
  matrix). The cap is part of the parametrisation, so no optimiser step and no weight normalisation
  can undo it.
* :class:`CenteredGroupNorm`: GroupNorm without the division by the standard deviation,
  ``gamma * (x - mean_group(x)) + b`` with ``|gamma| <= gamma_max``: the centring is an orthogonal
  projection (gain 1), so its Lipschitz constant is ``max |gamma|``.
* :func:`nearest_upsample_gain`: the L2 gain of nearest upsampling (2^k for a factor 2^k).
* :func:`lipschitz_budget`: the per-conv caps that keep the composed bound of the multiscale f under a target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .weight_norm import ReparamConv2d, conv2d

Tensor = torch.Tensor


def _output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def conv_adjoint(u: Tensor, weight: Tensor, in_hw: Tuple[int, int], stride: int, padding: int) -> Tensor:
    """A^T u for the convolution A = ``conv2d(., weight, stride=stride, padding=padding)`` on inputs of
    spatial size ``in_hw``: (N, C_out, H', W') -> (N, C_in, H, W) (``output_padding`` restores the
    rows and columns that a strided convolution does not reach)."""
    k_h, k_w = weight.shape[-2:]
    h_out, w_out = u.shape[-2:]
    pad_h = in_hw[0] - ((h_out - 1) * stride - 2 * padding + k_h)
    pad_w = in_hw[1] - ((w_out - 1) * stride - 2 * padding + k_w)
    return F.conv_transpose2d(u, weight, stride=stride, padding=padding, output_padding=(pad_h, pad_w))


def _unit(v: Tensor) -> Tensor:
    return v / v.norm().clamp_min(1e-30)


@torch.no_grad()
def power_step(weight: Tensor, v: Tensor, stride: int, padding: int, iters: int = 1) -> Tensor:
    """``iters`` steps v <- A^T A v / ||A^T A v|| of the power method for the convolution A
    (``weight``, ``stride``, ``padding``) at the resolution of ``v`` (1, C_in, H, W); returns the new v."""
    for _ in range(iters):
        v = _unit(conv_adjoint(F.conv2d(v, weight, stride=stride, padding=padding), weight, v.shape[-2:],
                               stride, padding))
    return v


def conv_operator_norm(weight: Tensor, in_shape: Sequence[int], stride: int = 1, padding: int = 0,
                       iters: int = 50, v0: Optional[Tensor] = None,
                       generator: Optional[torch.Generator] = None) -> Tuple[float, Tensor]:
    """Power-method estimate of ||A||_2, A the convolution ``conv2d(., weight, stride, padding)`` on
    inputs of shape ``in_shape`` = (C_in, H, W).

    Each iteration is one convolution and one transposed convolution (A^T A v). The estimate
    ||A v|| / ||v|| never exceeds ||A|| and approaches it from below; see docs/lipschitz.md for the
    margin that turns it into the certified figure.

    Args:
        weight: (C_out, C_in, k, k).
        in_shape: (C_in, H, W), the input the convolution runs on.
        iters: power iterations (>= 1).
        v0: (1, C_in, H, W) start vector (a random one when None, drawn by the CPU ``generator``).

    Returns:
        (the estimate, the last unit vector (1, C_in, H, W)).
    """
    if iters < 1:
        raise ValueError(f"iters = {iters} must be >= 1")
    if len(in_shape) != 3 or in_shape[0] != weight.shape[1]:
        raise ValueError(f"in_shape {tuple(in_shape)} must be (C_in, H, W) with C_in = {weight.shape[1]}")
    w = weight.detach().float()
    if v0 is None:
        v0 = torch.randn(1, *in_shape, generator=generator).to(w.device)   # a CPU generator on any device
    v = power_step(w, _unit(v0.detach().float()), stride, padding, iters)
    with torch.no_grad():
        sigma = float(F.conv2d(v, w, stride=stride, padding=padding).norm())
    return sigma, v


class SpectralCapConv2d(ReparamConv2d):
    """A bias-free convolution with the effective weight ``W * min(1, cap / sigma_hat(W))``.

    ``W`` is the weight-normalised weight (``wnorm``, parameters ``base.weight_g`` / ``base.weight_v``) or a
    plain one (``base.weight``); ``sigma_hat(W) = ||A_W v||`` for the persistent unit vector ``v``
    (buffer, (1, C_in, H, W)), which ``power_iters`` power steps refine at every training-mode
    evaluation of :attr:`weight` (once per model call, inside :func:`~mdeq.modules.weights_fixed`) and
    that :meth:`operator_norm` (the certificate) re-seeds from random starts.
    The scale is differentiated through ``sigma_hat`` as in ``torch.nn.utils.spectral_norm``.

    Shapes: input (N, C_in, H, W) with (H, W) = ``in_hw`` -> (N, C_out, H', W').
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, in_hw: Tuple[int, int],
                 stride: int = 1, cap: float = 1.0, wnorm: bool = False, power_iters: int = 1) -> None:
        super().__init__(stride, kernel_size // 2)
        if cap <= 0:
            raise ValueError(f"cap = {cap} must be > 0")
        self.base = conv2d(in_channels, out_channels, kernel_size, stride, wnorm=wnorm)
        self.in_hw = (int(in_hw[0]), int(in_hw[1]))
        self.cap = float(cap)
        self.power_iters = int(power_iters)
        self.register_buffer("power_v", _unit(torch.randn(1, in_channels, *self.in_hw)))

    @property
    def in_shape(self) -> Tuple[int, int, int]:
        """(C_in, H, W): the input the operator norm is taken on."""
        return (int(self.power_v.shape[1]), *self.in_hw)

    def base_weight(self) -> Tensor:
        """W, the weight before the cap (C_out, C_in, k, k)."""
        base = self.base
        fixed = getattr(base, "fixed_weight", None)
        return fixed if fixed is not None else base.weight

    @property
    def weight(self) -> Tensor:
        w = self.base_weight()
        # in float32 also under autocast: the cap is only as exact as sigma_hat
        with torch.autocast(w.device.type, enabled=False):
            w32 = w.float()
            if self.training:
                self.power_v.copy_(power_step(w32.detach(), self.power_v, self.stride, self.padding, self.power_iters))
            sigma = F.conv2d(self.power_v.clone(), w32, stride=self.stride, padding=self.padding).norm()
            return w * (self.cap / sigma.clamp_min(1e-12)).clamp(max=1.0).to(w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.in_hw:
            raise ValueError(f"SpectralCapConv2d built for inputs of {self.in_hw[0]}x{self.in_hw[1]} got "
                             f"{tuple(x.shape[-2:])}: its certified norm is for that resolution (set MODEL.IMAGE_SIZE "
                             "to the images' size)")
        return super().forward(x)

    def operator_norm(self, iters: int, restarts: int = 1, generator: Optional[torch.Generator] = None) -> float:
        """Power-method estimate of the effective weight's operator norm: the largest of ``iters`` steps
        from the persistent vector and from each of ``restarts`` random vectors. An optimiser step can
        leave the persistent vector in a direction that the step made weak (the cap's sigma_hat is then
        low); the random starts catch that, and the best vector becomes the persistent one, so that the
        next training call's cap is taken on it."""
        with torch.no_grad():
            w = self.fixed_weight if self.fixed_weight is not None else self.weight_no_update()
            best, best_v = conv_operator_norm(w, self.in_shape, self.stride, self.padding, iters, v0=self.power_v)
            for _ in range(restarts):
                sigma, v = conv_operator_norm(w, self.in_shape, self.stride, self.padding, iters,
                                              generator=generator)
                if sigma > best:
                    best, best_v = sigma, v
            self.power_v.copy_(best_v)
        return best

    def weight_no_update(self) -> Tensor:
        """The effective weight without a power step (what evaluation uses)."""
        training = self.training
        self.training = False
        try:
            return self.weight
        finally:
            self.training = training

    def extra_repr(self) -> str:
        return f"in_hw={self.in_hw}, stride={self.stride}, cap={self.cap:.4g}"


class CenteredGroupNorm(nn.Module):
    """``gamma * (x - mean over each group) + b`` per channel, ``gamma`` clipped to [-gamma_max, gamma_max].

    No division by the standard deviation: the centring is an orthogonal projection, so the map
    has Lipschitz constant ``max |gamma|`` (:meth:`gain`). (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, num_groups: int, channels: int, gamma_max: float) -> None:
        super().__init__()
        if channels % num_groups:
            raise ValueError(f"{channels} channels do not split into {num_groups} groups")
        if gamma_max <= 0:
            raise ValueError(f"gamma_max = {gamma_max} must be > 0")
        self.num_groups, self.gamma_max = int(num_groups), float(gamma_max)
        self.weight = nn.Parameter(torch.full((channels,), min(1.0, self.gamma_max)))
        self.bias = nn.Parameter(torch.zeros(channels))

    def gamma(self) -> Tensor:
        """The clipped gamma (C,)."""
        return self.weight.clamp(-self.gamma_max, self.gamma_max)

    def gain(self) -> float:
        """max |gamma|: the Lipschitz constant."""
        return float(self.gamma().detach().abs().max())

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[:2]
        grouped = x.reshape(n, self.num_groups, -1)
        centred = (grouped - grouped.mean(dim=2, keepdim=True)).reshape_as(x)
        shape = (1, c) + (1,) * (x.dim() - 2)
        return centred * self.gamma().view(shape).to(x.dtype) + self.bias.view(shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.weight.numel()}, gamma_max={self.gamma_max}"


def nearest_upsample_gain(in_hw: Tuple[int, int], out_hw: Tuple[int, int]) -> float:
    """The L2 gain of ``F.interpolate(., size=out_hw, mode='nearest')`` from ``in_hw``: the square root
    of the largest number of copies of one input pixel (2^k for an exact factor 2^k)."""
    copies = 1
    for n_in, n_out in zip(in_hw, out_hw):
        # on the CPU also where a model is built on another device (or the meta device)
        src = F.interpolate(torch.arange(n_in, dtype=torch.float32, device="cpu").view(1, 1, -1), size=n_out,
                            mode="nearest")
        copies *= int(torch.bincount(src.long().flatten(), minlength=n_in).max())
    return math.sqrt(copies)


@dataclass(frozen=True)
class LipschitzBudget:
    """The caps of the convolutions' operator norms that keep the composed bound under ``target``.

    Attributes:
        block_cap: the cap of each residual-block convolution.
        fusion_cap: the cap of a strided fusion convolution (each downsampling factor sigma * gamma <= 1).
        margin: the certified norm of a conv is its power-method estimate times ``1 + margin``; the caps
            leave room for it.
    """

    target: float
    block_cap: float
    fusion_cap: float
    margin: float

    def upsample_cap(self, upsample_gain: float) -> float:
        """The cap of the conv1x1 of an upsampling fusion map of gain ``upsample_gain`` (its factor <= 1)."""
        return self.fusion_cap / upsample_gain


def lipschitz_budget(target: float, alpha: float, beta: float, slope: float, gamma_max: float, margin: float,
                     num_branches: int, max_blocks: int) -> LipschitzBudget:
    """The caps under which the composed bound of the multiscale f is at most ``target``.

    With every fusion factor g_ij <= 1 and softmax rows w_i, ||(1 - beta) I + beta (w * g)||_2 <=
    (1 - beta) + beta sqrt(n), so each branch's gain must be at most R = target / ((1 - beta) + beta sqrt(n)),
    each of its ``max_blocks`` blocks at most R^(1 / max_blocks) = (1 - alpha) + alpha L_in, with
    L_in = sigma_1 sigma_2 gamma^2 slope.

    Raises:
        ValueError: the target cannot be met (1 - alpha already exceeds a block's share), naming the keys.
    """
    n = int(num_branches)
    branch = target / ((1 - beta) + beta * math.sqrt(n))
    block = branch ** (1.0 / max(1, int(max_blocks)))
    inner = (block - (1 - alpha)) / alpha
    if inner <= 0:
        raise ValueError(f"MODEL.LIPSCHITZ: TARGET {target} cannot be met with ALPHA {alpha}, BETA {beta} and "
                         f"{n} branches of up to {max_blocks} blocks: a block's share of the bound is {block:.4g}, "
                         f"at most 1 - ALPHA = {1 - alpha:.4g}; raise TARGET or ALPHA, or lower BETA")
    sigma = math.sqrt(inner / slope) / gamma_max        # each of the block's two convolutions
    return LipschitzBudget(target=target, block_cap=sigma / (1 + margin), fusion_cap=1.0 / (gamma_max * (1 + margin)),
                           margin=margin)
