"""FLOPs of a model's convolutions and linear layers, counted from forward hooks: 2 * output
elements * (C_in / groups * kh * kw) per convolution, 2 * output elements * in_features per linear
layer (bias and elementwise work left out), what ``torch.utils.flop_counter`` counts for them,
without its first-use cost (about a second, in every run's wall time)."""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..modules import ReparamConv2d, WeightNormConv2d
from ..utils.distributed import unwrap

logger = logging.getLogger(__name__)

_COUNTED = (nn.Conv2d, ReparamConv2d, nn.Linear)   # ReparamConv2d: weight-normed, capped (Lipschitz)


def layer_flops(hooked: nn.Module, run: Callable[[], Any]) -> int:
    """FLOPs of the convolutions and linear layers inside ``hooked`` while ``run()`` runs."""
    total = [0]

    def count(mod: nn.Module, inputs, out: torch.Tensor) -> None:
        # the shape is what counts: a weight-normed conv's v has it without computing w
        weight = mod.weight_v if isinstance(mod, WeightNormConv2d) else mod.weight
        total[0] += 2 * out.numel() * weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in hooked.modules() if isinstance(m, _COUNTED)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return total[0]


def _one_image(net: nn.Module, channels: int, image_size: Sequence[int]) -> torch.Tensor:
    """A zero image (1, channels, H, W) for ``image_size`` = (W, H), on the model's device and dtype."""
    p = next(net.parameters())
    return torch.zeros(1, channels, int(image_size[1]), int(image_size[0]), device=p.device, dtype=p.dtype)


def f_flops(model: nn.Module, image_size: Sequence[int]) -> Optional[int]:
    """FLOPs of one evaluation of an MDEQ's f_theta for one image of ``image_size`` (W, H); None for
    a model without f (an explicit network) or when they cannot be counted."""
    net = unwrap(model)
    if not hasattr(net, "fullstage"):
        return None
    was_training = net.training
    net.eval()
    try:
        x = _one_image(net, net.in_channels, image_size)
        with torch.no_grad():
            inj = net.injection(x)
            return layer_flops(net.fullstage, lambda: net.fullstage([inj.new_zeros(1, *s) for s in
                                                                      net.state_shapes(inj)], inj))
    except Exception as e:  # the summary is informative only
        logger.debug("FLOP count skipped: %s", e)
        return None
    finally:
        net.train(was_training)


def forward_flops(model: nn.Module, channels: int, image_size: Sequence[int], **call: Any) -> int:
    """FLOPs of one evaluation-mode forward pass of ``model`` for one image (``channels``, ``image_size``
    (W, H)), ``call`` its keywords (an MDEQ's ``eps=0.0``: every step of the forward budget)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    try:
        x = _one_image(net, channels, image_size)
        with torch.no_grad():
            return layer_flops(net, lambda: net(x, **call))
    finally:
        net.train(was_training)
