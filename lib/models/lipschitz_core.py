"""The contractive f of the Lipschitz MDEQ (Sato & Iiduka, AISTATS 2026; docs/lipschitz.md).

f acts on the same multiscale state z = [z_1, ..., z_n], z_i (N, C_i, H_i, W_i), as
:class:`~mdeq.models.mdeq_core.MDEQModule`, and is built only from parts whose Lipschitz constant is
computed (:mod:`mdeq.modules.lipschitz`):

1. per resolution, blocks u = (1 - alpha) x + alpha (CGN(conv(a(CGN(conv(x))))) + injection), with
   ``a`` the scaled ReLU (slope s, gain s), CGN the GroupNorm without division by the std (gain
   max |gamma|), each conv capped (:class:`~mdeq.modules.SpectralCapConv2d`); the injection enters
   the first block of the highest resolution only and is constant in z (gain 0);
2. fusion y_i = (1 - beta) u_i + beta sum_j w_ij F_ij(u_j), w_i = softmax of a learnt row of logits,
   F_ii the identity, F_ij a chain of stride-2 conv3x3 + CGN (scaled ReLU between) for a finer j, a
   conv1x1 + CGN + nearest upsampling (gain 2^k) for a coarser j.

The certified bound (:meth:`LipschitzMDEQModule.certificate`) is taken in the L2 norm of the
concatenated state: with r_j the bound of branch j and g_ij that of F_ij,
||dy_i|| <= sum_j M_ij r_j ||dz_j||, M = (1 - beta) I + beta (w * g), so Lip(f) <= ||M diag(r)||_2, the
exact largest singular value of that n x n matrix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules import CenteredGroupNorm, LipschitzBudget, SpectralCapConv2d, nearest_upsample_gain
from .mdeq_core import Activation, BranchNet

Tensor = torch.Tensor
HW = Tuple[int, int]


class ScaledActivation(Activation):
    """``slope * relu(x)`` (or ``slope * softplus(x)`` during the softplus warm-up): gain ``slope``."""

    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = float(slope)

    def forward(self, x: Tensor) -> Tensor:
        return self.slope * super().forward(x)


@dataclass(frozen=True)
class LipschitzSettings:
    """The hyperparameters of the contractive f (``MODEL.LIPSCHITZ``)."""

    alpha: float
    beta: float
    slope: float
    gamma_max: float
    power_iters: int
    wnorm: bool
    num_groups: int


def _gain(conv_norm: Dict[SpectralCapConv2d, float], conv: SpectralCapConv2d, gn: CenteredGroupNorm) -> float:
    return conv_norm[conv] * gn.gain()


class LipschitzBlock(nn.Module):
    """u = (1 - alpha) x + alpha (CGN(conv2(a(CGN(conv1(x))))) + injection). (N, C, H, W) -> same."""

    def __init__(self, channels: int, expansion: int, hw: HW, cap: float, s: LipschitzSettings) -> None:
        super().__init__()
        hidden = expansion * channels
        self.alpha = s.alpha
        self.conv1 = SpectralCapConv2d(channels, hidden, 3, hw, cap=cap, wnorm=s.wnorm, power_iters=s.power_iters)
        self.gn1 = CenteredGroupNorm(s.num_groups, hidden, s.gamma_max)
        self.relu = ScaledActivation(s.slope)
        self.conv2 = SpectralCapConv2d(hidden, channels, 3, hw, cap=cap, wnorm=s.wnorm, power_iters=s.power_iters)
        self.gn2 = CenteredGroupNorm(s.num_groups, channels, s.gamma_max)

    def forward(self, x: Tensor, injection: Optional[Tensor] = None) -> Tensor:
        out = self.gn2(self.conv2(self.relu(self.gn1(self.conv1(x)))))
        if injection is not None:
            out = out + injection
        return (1 - self.alpha) * x + self.alpha * out

    def gain(self, conv_norm: Dict[SpectralCapConv2d, float]) -> float:
        """(1 - alpha) + alpha * ||conv1|| max|gamma1| slope ||conv2|| max|gamma2|."""
        inner = _gain(conv_norm, self.conv1, self.gn1) * self.relu.slope * _gain(conv_norm, self.conv2, self.gn2)
        return (1 - self.alpha) + self.alpha * inner


class LipschitzBranch(BranchNet):
    """The blocks of one resolution; the injection enters the first. Gain: the product of the blocks'."""

    def gain(self, conv_norm: Dict[SpectralCapConv2d, float]) -> float:
        return math.prod(block.gain(conv_norm) for block in self.blocks)


class LipschitzDownsample(nn.Module):
    """Stream j -> coarser stream i: (i - j) stride-2 conv3x3 + CGN, scaled ReLU between them.
    Gain: the product of ||conv|| max|gamma| over the steps times slope^(steps - 1)."""

    def __init__(self, channels: Sequence[int], hws: Sequence[HW], in_res: int, out_res: int,
                 budget: LipschitzBudget, s: LipschitzSettings) -> None:
        super().__init__()
        layers: List[nn.Module] = []
        for k in range(out_res - in_res):
            last = k == out_res - in_res - 1
            out_c = channels[out_res] if last else channels[in_res]
            layers += [SpectralCapConv2d(channels[in_res], out_c, 3, hws[in_res + k], stride=2, cap=budget.fusion_cap,
                                         wnorm=s.wnorm, power_iters=s.power_iters),
                       CenteredGroupNorm(s.num_groups, out_c, s.gamma_max)]
            if not last:
                layers.append(ScaledActivation(s.slope))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor, size: HW) -> Tensor:
        return self.net(x)

    def gain(self, conv_norm: Dict[SpectralCapConv2d, float]) -> float:
        out = 1.0
        for m in self.net:
            out *= conv_norm[m] if isinstance(m, SpectralCapConv2d) else m.gain() if isinstance(
                m, CenteredGroupNorm) else m.slope
        return out


class LipschitzUpsample(nn.Module):
    """Stream j -> finer stream i: conv1x1 + CGN, nearest upsampling. Gain: ||conv|| max|gamma| times
    the upsampling's L2 gain (2^(j - i) for exact halvings)."""

    def __init__(self, channels: Sequence[int], hws: Sequence[HW], in_res: int, out_res: int,
                 budget: LipschitzBudget, s: LipschitzSettings) -> None:
        super().__init__()
        self.up_gain = nearest_upsample_gain(hws[in_res], hws[out_res])
        self.conv = SpectralCapConv2d(channels[in_res], channels[out_res], 1, hws[in_res],
                                      cap=budget.upsample_cap(self.up_gain), wnorm=s.wnorm, power_iters=s.power_iters)
        self.gnorm = CenteredGroupNorm(s.num_groups, channels[out_res], s.gamma_max)

    def forward(self, x: Tensor, size: HW) -> Tensor:
        return F.interpolate(self.gnorm(self.conv(x)), size=size, mode="nearest")

    def gain(self, conv_norm: Dict[SpectralCapConv2d, float]) -> float:
        return _gain(conv_norm, self.conv, self.gnorm) * self.up_gain


@dataclass
class LipschitzCertificate:
    """The certified bound of f and its parts (floats).

    Attributes:
        bound: the certified Lipschitz constant of f in the L2 norm of the concatenated state.
        target: MODEL.LIPSCHITZ.TARGET, which the parametrisation keeps ``bound`` under.
        branch_gains: r_j, the bound of each branch's blocks.
        coupling: the n x n matrix M diag(r) whose largest singular value is ``bound``.
        conv_norms: each capped convolution's certified operator norm (estimate x (1 + margin)), by name.
    """

    bound: float
    target: float
    branch_gains: List[float]
    coupling: List[List[float]]
    conv_norms: Dict[str, float] = field(default_factory=dict)


class LipschitzMDEQModule(nn.Module):
    """The contractive f_theta. ``forward(z, injection)``: a list of n states [(N, C_i, H_i, W_i)] -> a
    list of the same shapes; ``injection`` (N, C_1, H_1, W_1) enters the highest resolution only.

    Args:
        channels, num_blocks, expansion: as :class:`~mdeq.models.mdeq_core.MDEQModule`.
        hws: (H_i, W_i) of each stream, the resolutions the caps are certified at.
        budget: the caps (:func:`~mdeq.modules.lipschitz_budget`).
        settings: alpha, beta, slope, gamma_max, power iterations, weight norm, groups.
    """

    def __init__(self, channels: Sequence[int], num_blocks: Sequence[int], expansion: int, hws: Sequence[HW],
                 budget: LipschitzBudget, settings: LipschitzSettings) -> None:
        super().__init__()
        if not len(channels) == len(num_blocks) == len(hws):
            raise ValueError(f"NUM_CHANNELS {list(channels)}, NUM_BLOCKS {list(num_blocks)} and the "
                             f"{len(hws)} stream sizes differ in length")
        self.num_branches = n = len(channels)
        self.channels = list(channels)
        self.budget, self.settings = budget, settings
        self.beta = settings.beta
        self.branches = nn.ModuleList(
            LipschitzBranch([LipschitzBlock(c, expansion, hw, budget.block_cap, settings) for _ in range(nb)])
            for c, nb, hw in zip(channels, num_blocks, hws))
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(nn.Identity() if i == j else
                          (LipschitzUpsample if j > i else LipschitzDownsample)(channels, hws, j, i, budget, settings)
                          for j in range(n))
            for i in range(n)) if n > 1 else None
        # w_i = softmax(fuse_logits[i]); zeros: the uniform mixture
        self.fuse_logits = nn.Parameter(torch.zeros(n, n))

    def reset_dropout(self, states: Sequence[Tensor]) -> None:
        """Nothing to draw: the contractive f has no dropout (its 1 / (1 - p) would scale the bound;
        MODEL.DROPOUT must be 0). Called by :meth:`~mdeq.models.mdeq_core.MDEQNet.equilibrium_problem`."""

    def fusion_weights(self) -> Tensor:
        """(n, n) rows of softmax weights w_ij."""
        return torch.softmax(self.fuse_logits, dim=1)

    def forward(self, z: Sequence[Tensor], injection: Tensor) -> List[Tensor]:
        u = [branch(zi, injection if i == 0 else None) for i, (branch, zi) in enumerate(zip(self.branches, z))]
        if self.num_branches == 1:
            return u
        w = self.fusion_weights().to(u[0].dtype)
        fused = []
        for i in range(self.num_branches):
            size = u[i].shape[-2:]
            mix = w[i, i] * u[i]
            for j in range(self.num_branches):
                if j != i:
                    mix = mix + w[i, j] * self.fuse_layers[i][j](u[j], size)
            fused.append((1 - self.beta) * u[i] + self.beta * mix)
        return fused

    def capped_convs(self) -> List[Tuple[str, SpectralCapConv2d]]:
        """(name, module) of every capped convolution of f."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, SpectralCapConv2d)]

    @torch.no_grad()
    def certificate(self, iters: int = 50, restarts: int = 1) -> LipschitzCertificate:
        """The certified bound of f: each conv's power-method norm (the largest of ``iters`` steps from its
        persistent vector and from ``restarts`` random ones, :meth:`SpectralCapConv2d.operator_norm`) times
        ``1 + margin``, composed with the other parts' exact gains (module docstring)."""
        margin = 1.0 + self.budget.margin
        generator = torch.Generator().manual_seed(0)   # the random starts leave the global generator alone
        norms = {m: m.operator_norm(iters, restarts, generator) * margin for _, m in self.capped_convs()}
        r = [branch.gain(norms) for branch in self.branches]
        n = self.num_branches
        g = torch.ones(n, n, dtype=torch.float64)
        if n > 1:
            for i in range(n):
                for j in range(n):
                    if i != j:
                        g[i, j] = self.fuse_layers[i][j].gain(norms)
        w = self.fusion_weights().detach().double().cpu()
        coupling = ((1 - self.beta) * torch.eye(n, dtype=torch.float64) + self.beta * w * g) * \
            torch.tensor(r, dtype=torch.float64)[None, :]
        bound = float(torch.linalg.matrix_norm(coupling, ord=2))
        return LipschitzCertificate(bound=bound, target=self.budget.target, branch_gains=r,
                                    coupling=coupling.tolist(),
                                    conv_norms={name: norms[m] for name, m in self.capped_convs()})
