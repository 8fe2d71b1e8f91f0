"""The explicit baseline: a residual network of the CIFAR kind (He et al. 2016, section 4.2).

A conv3x3 stem to ``WIDTHS[0]`` channels, three stages of ``(DEPTH - 2) / 6`` basic residual blocks
(two conv3x3 with BatchNorm) at ``WIDTHS[0..2]`` channels, the second and third stage starting
with stride 2, then global average pooling and a linear classifier. A block that changes the
width or the resolution has a conv1x1 + BatchNorm shortcut (the paper's option B).
``MODEL.RESNET.DEPTH`` 20 with ``WIDTHS`` [16, 32, 64] is the paper's ResNet-20.

It takes the engine's calls as the MDEQ does (``train_step``, ``jac_loss``, ``return_info``) and
returns an :class:`~mdeq.modules.EquilibriumInfo` of mode ``'explicit'``: no solver runs, so no
solver statistic is reported.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..modules import EXPLICIT, EquilibriumInfo

Tensor = torch.Tensor


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut, ReLU. (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""

    #: each BatchNorm and the conv it follows (what :func:`mdeq.models.inference.fold_batchnorm` folds)
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, c_in: int, c_out: int, stride: int, momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out, momentum=momentum)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out, momentum=momentum)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out, momentum=momentum))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def conv_bn_relu(c_in: int, c_out: int, momentum: float, stride: int = 1) -> nn.Sequential:
    """conv3x3 (no bias)-BN-ReLU: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride). The ResNet's stem,
    and the MDEQ's (:class:`~mdeq.models.mdeq_core.MDEQNet`: its strided stem, its full-resolution stem)."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(c_out, momentum=momentum), nn.ReLU(inplace=True))


def residual_stage(c_in: int, c_out: int, blocks: int, stride: int, momentum: float) -> nn.Sequential:
    """``blocks`` :class:`BasicBlock` s, the first from ``c_in`` channels at ``stride``, the rest at
    ``c_out`` and stride 1: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
    return nn.Sequential(*[BasicBlock(c_in if b == 0 else c_out, c_out, stride if b == 0 else 1, momentum)
                           for b in range(blocks)])


class ResNetClsNet(nn.Module):
    """Images (N, MODEL.IN_CHANNELS, H, W) -> logits (N, MODEL.NUM_CLASSES); see the module docstring."""

    forward_kind = EXPLICIT

    def __init__(self, depth: int, widths: Sequence[int], in_channels: int, num_classes: int,
                 momentum: float = 0.1) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth {depth} must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...)")
        if len(widths) != 3:
            raise ValueError(f"ResNet widths {list(widths)} must have 3 entries, one per stage")
        blocks = (depth - 2) // 6
        self.stem = conv_bn_relu(in_channels, widths[0], momentum)
        self.stages = nn.Sequential(*[residual_stage(c_in, width, blocks, 1 if s == 0 else 2, momentum)
                                      for s, (c_in, width) in enumerate(zip([widths[0], *widths[:-1]], widths))])
        self.classifier = nn.Linear(widths[-1], num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        """He (fan-out) initialisation of the convolutions, BatchNorm to (1, 0)."""
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: Tensor, train_step: Optional[int] = None, return_info: bool = False,
                jac_loss: bool = False) -> Union[Tensor, Tuple[Tensor, EquilibriumInfo]]:
        """Logits (N, NUM_CLASSES); with ``return_info``, ``(logits, EquilibriumInfo(mode='explicit'))``.
        ``train_step`` is accepted and has no effect (there is no warm-up); ``jac_loss`` cannot be
        given (there is no f whose Jacobian could be regularised)."""
        if jac_loss:
            raise ValueError("an explicit network has no equilibrium map f: it has no Jacobian term (jac_loss)")
        logits = self.classifier(self.stages(self.stem(x)).mean(dim=(2, 3)))
        return (logits, EquilibriumInfo(mode=EXPLICIT)) if return_info else logits
