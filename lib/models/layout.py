"""Channels-last layout for the layers outside the equilibrium's f (stem and head, or the whole of an
explicit network), in training and in evaluation.

On a CPU a convolution of few channels runs several times faster on channels-last tensors than on
NCHW ones. A convolution whose weight is channels-last runs channels-last and hands its output on in
that layout, so converting the weights is enough: the input images stay NCHW, and the layers after
the first one see channels-last tensors. In training, the gradients, the optimizer's state and the
checkpoints then keep the weights' layout; loading a state dict copies the values into the
parameters as they are, so checkpoints load into either layout. f (``fullstage``) is left alone: the
layout of its states is MODEL.STATE_LAYOUT's.

One exception, for the gradients' sake: oneDNN's weight gradient of a 1x1 convolution with a stride
on a channels-last input of fewer channels than its vector block is wrong (relative error about 1 in
torch 2.14.1 on an AVX2 CPU, at 2-7 input channels; oneDNN issue 6035: the kernel writes past its
workspace, and can also hang), while its output and input gradient are right. Such convolutions (the
ResNet's projection shortcuts) keep NCHW weights and get their input in NCHW wherever gradients flow.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn


def _strided_pointwise(conv: nn.Conv2d) -> bool:
    return tuple(conv.kernel_size) == (1, 1) and tuple(conv.stride) != (1, 1)


def _nchw_input(module: nn.Module, args: Tuple) -> Tuple:
    """Forward pre-hook: the input in NCHW layout (a copy only where it is channels-last)."""
    return (args[0].contiguous(),) + tuple(args[1:])


def channels_last_outside_f(model: nn.Module, backward: bool = True) -> int:
    """Put, in place, the weight of every ``nn.Conv2d`` of ``model`` outside its f (``fullstage``, if it
    has one) in channels-last layout. With ``backward`` (gradients will flow), a strided 1x1 convolution
    instead keeps its NCHW weight and gets its input in NCHW (see the module docstring). Returns how
    many weights were converted. Without ``backward`` such a convolution is converted too, and loses
    that input conversion if an earlier call gave it one (an evaluation copy of a model trained so).

    Call it before the optimizer is built: it replaces the parameters' storage (``weight.data``).
    """
    f = getattr(model, "fullstage", None)
    in_f = {id(m) for m in f.modules()} if f is not None else set()
    converted = 0
    for module in model.modules():
        if not isinstance(module, nn.Conv2d) or id(module) in in_f:
            continue
        if backward and _strided_pointwise(module):
            if _nchw_input not in module._forward_pre_hooks.values():
                module.register_forward_pre_hook(_nchw_input)
            continue
        for key in [k for k, hook in module._forward_pre_hooks.items() if hook is _nchw_input]:
            del module._forward_pre_hooks[key]
        module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
        converted += 1
    return converted


def training_layout(model: nn.Module, cfg) -> nn.Module:
    """``model`` with the layout that its training runs in: :func:`channels_last_outside_f` where
    TRAIN.CHANNELS_LAST is on, else as it is (returned for chaining)."""
    if cfg.TRAIN.CHANNELS_LAST:
        channels_last_outside_f(model)
    return model
