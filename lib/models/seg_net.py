"""MDEQ for semantic segmentation: the equilibrium core plus a light per-pixel head."""
from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mdeq_core import MDEQNet

Tensor = torch.Tensor


class MDEQSegNet(MDEQNet):
    """Images (N, 3, H, W) -> logits (N, MODEL.NUM_CLASSES, H_1, W_1) at the highest resolution
    of the equilibrium (H/4 with two downsamplings).

    Head: every stream upsampled bilinearly (``align_corners=True``, unlike the loss and the evaluation's
    resizing, which use False) to the highest resolution, concatenated, conv1x1-BN-ReLU, then a conv of
    ``MODEL.EXTRA.FINAL_CONV_KERNEL`` to the classes.
    """

    def __init__(self, cfg, bn_momentum: float = 0.01) -> None:
        super().__init__(cfg, bn_momentum)
        channels = sum(self.num_channels)
        momentum = self.downsample[1].momentum
        k = cfg.MODEL.EXTRA.FINAL_CONV_KERNEL
        self.last_layer = nn.Sequential(
            nn.Conv2d(channels, channels, 1),
            nn.BatchNorm2d(channels, momentum=momentum),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, cfg.MODEL.NUM_CLASSES, k, padding=k // 2),
        )

    def head(self, states: List[Tensor]) -> Tensor:
        """Per-resolution states -> logits (N, MODEL.NUM_CLASSES, H_1, W_1) at the highest resolution."""
        size = states[0].shape[-2:]
        ups = [states[0]] + [F.interpolate(s, size=size, mode="bilinear", align_corners=True) for s in states[1:]]
        return self.last_layer(torch.cat(ups, dim=1))
