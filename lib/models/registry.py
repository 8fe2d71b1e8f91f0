"""The models that ``MODEL.NAME`` names, per task: what :func:`get_cls_net` and :func:`get_seg_net` build.

=================  ===============================================================================
``mdeq``           the MDEQ (classification and segmentation): the equilibrium of f_theta, after the
                   unrolled warm-up of ``TRAIN.PRETRAIN_STEPS`` steps
``mdeq_unrolled``  the unrolled baseline (classification): the same stem, f_theta and head, every
                   call, in training and in evaluation, the weight-tied stack of ``MODEL.NUM_LAYERS``
                   applications of f, trained by backpropagation through it
``resnet``         the explicit baseline (classification): a CIFAR ResNet (:mod:`mdeq.models.resnet`),
                   ``MODEL.RESNET.DEPTH`` and ``WIDTHS``
=================  ===============================================================================

Each model says what it computes in ``forward_kind`` (``'equilibrium'``, ``'unrolled'`` or
``'explicit'``), which the engine and the programs read to leave out what does not apply to it.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch.nn as nn

from ..config import ConfigError
from ..config.validation import register_choices
from .cls_net import MDEQClsNet
from .mdeq_core import _bn_momentum
from .resnet import ResNetClsNet
from .seg_net import MDEQSegNet

#: the settings of the equilibrium's f that a model without one cannot honour: (key, its "off" test)
_F_ONLY_SETTINGS: Tuple[Tuple[str, Callable[[object], bool]], ...] = (
    ("MODEL.JAC_LOSS_WEIGHT", lambda v: v == 0), ("MODEL.JAC_INCREMENTAL", lambda v: v == 0),
    ("MODEL.SOFTPLUS_WARMUP", lambda v: not v), ("MODEL.COMPILE", lambda v: not v),
    ("MODEL.SPECTRAL_RADIUS_ITERS", lambda v: v == 0), ("MODEL.LIPSCHITZ.ENABLED", lambda v: not v))
#: of those, the ones that the unrolled stack honours (it has f, but no equilibrium)
_UNROLLED_HONOURS = ("MODEL.JAC_LOSS_WEIGHT", "MODEL.JAC_INCREMENTAL", "MODEL.SOFTPLUS_WARMUP", "MODEL.COMPILE",
                     "MODEL.LIPSCHITZ.ENABLED")


def _setting(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_settings_apply(cfg, honoured: Tuple[str, ...] = ()) -> None:
    """Refuse a setting of the equilibrium that ``cfg.MODEL.NAME``'s model cannot honour (it would be
    silently without effect): every key of :data:`_F_ONLY_SETTINGS` not in ``honoured`` must be off.

    Raises:
        ConfigError: naming the key, its value and the model.
    """
    for key, is_off in _F_ONLY_SETTINGS:
        value = _setting(cfg, key)
        if key not in honoured and not is_off(value):
            raise ConfigError(f"{key} = {value!r} does not apply to MODEL.NAME {cfg.MODEL.NAME!r}, which has no "
                              f"equilibrium: leave it at its default")


def _cls_mdeq(cfg) -> nn.Module:
    model = MDEQClsNet(cfg, bn_momentum=0.1)
    model.init_weights()
    return model


def _cls_mdeq_unrolled(cfg) -> nn.Module:
    check_settings_apply(cfg, _UNROLLED_HONOURS)
    model = MDEQClsNet(cfg, bn_momentum=0.1, default_mode="unrolled")
    model.init_weights()
    return model


def _cls_resnet(cfg) -> nn.Module:
    check_settings_apply(cfg)
    r = cfg.MODEL.RESNET
    return ResNetClsNet(r.DEPTH, list(r.WIDTHS), cfg.MODEL.IN_CHANNELS, cfg.MODEL.NUM_CLASSES, _bn_momentum(cfg, 0.1))


def _seg_mdeq(cfg) -> nn.Module:
    if cfg.MODEL.LIPSCHITZ.ENABLED:   # its caps are certified at one resolution; segmentation crops vary
        raise ConfigError("MODEL.LIPSCHITZ.ENABLED applies to classification only: the contractive f certifies its "
                          "convolutions at the one resolution of MODEL.IMAGE_SIZE")
    model = MDEQSegNet(cfg, bn_momentum=0.01)
    model.init_weights()
    return model


#: classification models by MODEL.NAME (each: cfg -> initialised model on the CPU)
CLS_MODELS: Dict[str, Callable[..., nn.Module]] = {"mdeq": _cls_mdeq, "mdeq_unrolled": _cls_mdeq_unrolled,
                                                   "resnet": _cls_resnet}
#: segmentation models by MODEL.NAME
SEG_MODELS: Dict[str, Callable[..., nn.Module]] = {"mdeq": _seg_mdeq}

register_choices("MODEL.NAME", lambda: tuple(dict.fromkeys([*CLS_MODELS, *SEG_MODELS])))


def build_model(models: Dict[str, Callable[..., nn.Module]], task: str, cfg) -> nn.Module:
    """The model of ``cfg.MODEL.NAME`` among ``models`` (the ``task``'s), built and initialised.

    Raises:
        ConfigError: ``MODEL.NAME = '<name>' is not a <task> model; choose one of (...)``.
    """
    name = cfg.MODEL.NAME
    if name not in models:
        raise ConfigError(f"MODEL.NAME = {name!r} is not a {task} model; choose one of {tuple(models)}")
    return models[name](cfg)
