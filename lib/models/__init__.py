"""MDEQ models and their baselines: :func:`get_cls_net` and :func:`get_seg_net` build the one that
``MODEL.NAME`` names (:mod:`mdeq.models.registry`) from a config."""
from __future__ import annotations

import torch.nn as nn

from .cls_net import Bottleneck, MDEQClsNet
from .mdeq_core import EquilibriumProblem, MDEQModule, MDEQNet
from .registry import CLS_MODELS, SEG_MODELS, build_model, check_settings_apply
from .resnet import ResNetClsNet
from .seg_net import MDEQSegNet

#: the modules that a classification MDEQ and a segmentation MDEQ share (stem and f_theta): what
#: MODEL.PRETRAINED initialises and what pretrained_models/convert_cls_to_seg.py keeps
BACKBONE_PREFIXES = ("full_res_stem.", "downsample.", "stage0.", "fullstage.")


def get_cls_net(cfg) -> nn.Module:
    """The classification model of ``cfg.MODEL.NAME`` (:data:`CLS_MODELS`; BN momentum 0.1 unless
    MODEL.BN_MOMENTUM), initialised. An unknown name is a ConfigError naming the choices."""
    return build_model(CLS_MODELS, "classification", cfg)


def get_seg_net(cfg) -> MDEQSegNet:
    """The segmentation MDEQ of ``cfg`` (BN momentum 0.01 unless MODEL.BN_MOMENTUM), initialised.

    ``MODEL.PRETRAINED`` is not read here: the training script loads it (see
    :func:`mdeq.utils.checkpoint.load_pretrained`) so that it can report what was found.
    """
    return build_model(SEG_MODELS, "segmentation", cfg)


def forward_kind(model: nn.Module) -> str:
    """What ``model`` computes after its warm-up: ``'equilibrium'``, ``'unrolled'`` or ``'explicit'``
    (its ``forward_kind``; a model that does not say is taken for an equilibrium model)."""
    return str(getattr(model, "forward_kind", "equilibrium"))


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["BACKBONE_PREFIXES", "CLS_MODELS", "SEG_MODELS", "build_model", "check_settings_apply", "forward_kind",
           "get_cls_net", "get_seg_net", "count_parameters", "MDEQClsNet", "MDEQSegNet", "MDEQNet", "MDEQModule",
           "EquilibriumProblem", "Bottleneck", "ResNetClsNet"]
