"""MDEQ models: :func:`get_cls_net` and :func:`get_seg_net` build them from a config."""
from __future__ import annotations

import torch.nn as nn

from .cls_net import Bottleneck, MDEQClsNet
from .mdeq_core import EquilibriumProblem, MDEQModule, MDEQNet
from .seg_net import MDEQSegNet

#: the modules that a classification MDEQ and a segmentation MDEQ share (stem and f_theta): what
#: MODEL.PRETRAINED initialises and what pretrained_models/convert_cls_to_seg.py keeps
BACKBONE_PREFIXES = ("downsample.", "stage0.", "fullstage.")


def get_cls_net(cfg) -> MDEQClsNet:
    """The classification MDEQ of ``cfg`` (BN momentum 0.1 unless MODEL.BN_MOMENTUM), initialised."""
    model = MDEQClsNet(cfg, bn_momentum=0.1)
    model.init_weights()
    return model


def get_seg_net(cfg) -> MDEQSegNet:
    """The segmentation MDEQ of ``cfg`` (BN momentum 0.01 unless MODEL.BN_MOMENTUM), initialised.

    ``MODEL.PRETRAINED`` is not read here: the training script loads it (see
    :func:`mdeq.utils.checkpoint.load_pretrained`) so that it can report what was found.
    """
    model = MDEQSegNet(cfg, bn_momentum=0.01)
    model.init_weights()
    return model


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["BACKBONE_PREFIXES", "get_cls_net", "get_seg_net", "count_parameters", "MDEQClsNet", "MDEQSegNet", "MDEQNet",
           "MDEQModule", "EquilibriumProblem", "Bottleneck"]
