"""MDEQ for image classification: the equilibrium core plus an HRNet-style head."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from .mdeq_core import MDEQNet

Tensor = torch.Tensor


class Bottleneck(nn.Module):
    """The head's bottleneck (1x1, 3x3, 1x1 convs; non-affine BN as in the original), x4 channels.

    (N, C_in, H, W) -> (N, 4 * planes, H, W).
    """

    expansion = 4
    #: each BatchNorm and the conv it follows (what :func:`mdeq.models.inference.fold_batchnorm` folds)
    conv_bn_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def __init__(self, inplanes: int, planes: int, momentum: float) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=momentum, affine=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, momentum=momentum, affine=False)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out, momentum=momentum, affine=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, bias=False),
                                            nn.BatchNorm2d(out, momentum=momentum))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(out + residual)


class MDEQClsNet(MDEQNet):
    """Images (N, 3, H, W) -> logits (N, MODEL.NUM_CLASSES).

    Head: a bottleneck per resolution widens stream i to ``4 * HEAD_CHANNELS[i]``; stride-2
    conv3x3 merges carry the finest stream down to the coarsest; a conv1x1 to
    ``FINAL_CHANSIZE``, global average pooling and a linear classifier.
    """

    def __init__(self, cfg, bn_momentum: float = 0.1, default_mode: str = "equilibrium") -> None:
        super().__init__(cfg, bn_momentum, default_mode)
        stage = cfg.MODEL.EXTRA.FULL_STAGE
        heads: Sequence[int] = list(stage.HEAD_CHANNELS)
        if len(heads) != self.num_branches:
            raise ValueError(f"MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS has {len(heads)} entries {heads}, "
                             f"NUM_BRANCHES is {self.num_branches}")
        momentum = self.downsample[1].momentum
        exp = Bottleneck.expansion
        self.incre_modules = nn.ModuleList(
            nn.Sequential(Bottleneck(c, h, momentum)) for c, h in zip(self.num_channels, heads))
        self.downsamp_modules = nn.ModuleList(
            nn.Sequential(nn.Conv2d(heads[i] * exp, heads[i + 1] * exp, 3, stride=2, padding=1, bias=True),
                          nn.BatchNorm2d(heads[i + 1] * exp, momentum=momentum),
                          nn.ReLU(inplace=True))
            for i in range(self.num_branches - 1))
        self.final_layer = nn.Sequential(nn.Conv2d(heads[-1] * exp, stage.FINAL_CHANSIZE, 1),
                                         nn.BatchNorm2d(stage.FINAL_CHANSIZE, momentum=momentum),
                                         nn.ReLU(inplace=True))
        self.classifier = nn.Linear(stage.FINAL_CHANSIZE, cfg.MODEL.NUM_CLASSES)

    head_gives_classes = True

    def head(self, states: List[Tensor]) -> Tensor:
        """Per-resolution states -> logits (N, NUM_CLASSES)."""
        y = self.incre_modules[0](states[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](states[i + 1]) + down(y)
        y = self.final_layer(y)
        return self.classifier(y.mean(dim=(2, 3)))
