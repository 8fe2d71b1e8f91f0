"""An evaluation copy of a model that computes the same function in less time: every BatchNorm that
follows a convolution folded into it, and the layers outside f in channels-last layout.

In evaluation a BatchNorm is an affine map per channel with its running statistics, so the convolution
before it can absorb it (w' = w * gamma / sqrt(var + eps) per output channel, b' = beta + (b - mean) *
gamma / sqrt(var + eps)); the outputs agree with the unfolded model's to float rounding. On a CPU,
convolutions of few channels run several times faster on channels-last tensors than on NCHW ones,
while a BatchNorm runs slower on them: folding removes it, so the two go together.

Which BatchNorm follows which convolution: in an ``nn.Sequential`` a BatchNorm2d right after a Conv2d;
any other module says so with a ``conv_bn_pairs`` attribute of (conv name, BatchNorm name) pairs whose
forward computes ``bn(conv(x))`` (:class:`~mdeq.models.resnet.BasicBlock`,
:class:`~mdeq.models.cls_net.Bottleneck`). Other BatchNorms (none in this package's models) stay.
"""
from __future__ import annotations

import copy
from typing import Iterator, Tuple

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .layout import channels_last_outside_f


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
            and bn.num_features == conv.out_channels)


def _pairs(module: nn.Module) -> Iterator[Tuple[str, str]]:
    """(conv name, BatchNorm name) of the children of ``module`` where the BatchNorm follows the conv."""
    if isinstance(module, nn.Sequential):
        names = list(module._modules)
        yield from zip(names[:-1], names[1:])
    else:
        yield from getattr(module, "conv_bn_pairs", ())


def fold_batchnorm(module: nn.Module) -> int:
    """Fold, in place, each BatchNorm2d that follows a Conv2d (see the module docstring) into that conv;
    the BatchNorm becomes an ``nn.Identity``. Only for evaluation: the folded model has no batch
    statistics to train. Returns how many were folded."""
    folded = 0
    for conv_name, bn_name in list(_pairs(module)):
        conv, bn = module._modules[conv_name], module._modules[bn_name]
        if _foldable(conv, bn):
            if bn.training:
                raise ValueError("fold_batchnorm folds running statistics: call it on a model in eval() mode")
            module._modules[conv_name] = fuse_conv_bn_eval(conv, bn)
            module._modules[bn_name] = nn.Identity().eval()
            folded += 1
    for child in module.children():
        folded += fold_batchnorm(child)
    return folded


def inference_model(model: nn.Module, fold_bn: bool = True, channels_last: bool = True) -> nn.Module:
    """A copy of ``model`` in eval mode, for evaluation only: with ``fold_bn`` BatchNorm folded
    (:func:`fold_batchnorm`) and, with ``channels_last``, the 4-D weights of the layers outside the
    equilibrium's f (``fullstage``, whose layout MODEL.STATE_LAYOUT sets) in channels-last layout, so
    that the stem and head run on channels-last tensors. ``model`` itself is left as it is.

    Shapes: the copy maps the same inputs to the same outputs as ``model.eval()``.
    """
    copied = copy.deepcopy(model).eval()
    if fold_bn:
        fold_batchnorm(copied)
    if channels_last:
        channels_last_outside_f(copied, backward=False)
    return copied


def evaluation_model(model: nn.Module, cfg) -> nn.Module:
    """What evaluations run (the tools' and the training's): :func:`inference_model` of ``model`` as
    TEST.FOLD_BN and TEST.CHANNELS_LAST say (``model`` in eval mode itself when both are off)."""
    if not (cfg.TEST.FOLD_BN or cfg.TEST.CHANNELS_LAST):
        return model.eval()
    return inference_model(model, fold_bn=bool(cfg.TEST.FOLD_BN), channels_last=bool(cfg.TEST.CHANNELS_LAST))
