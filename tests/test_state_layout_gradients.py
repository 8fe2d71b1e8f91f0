"""MODEL.STATE_LAYOUT: every gradient of the released Fashion-MNIST network, in float32 in either layout
of f's states, is the float64 NCHW one to float32 rounding. A layout-specific CPU kernel can be wrong
where the NCHW one is right (docs/performance.md, CPU settings: channels-last training); this keeps the
layouts that training can take honest at the released model's shapes."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import load_config
from mdeq.models import get_cls_net

FMNIST = Path(__file__).resolve().parents[1] / "experiments/fashion_mnist/cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1.yaml"


@pytest.mark.parametrize("state_layout", ["nchw", "channels_last"])
def test_every_gradient_of_the_released_network_is_the_float64_nchw_one(state_layout):
    """Through 3 applications of f (exact arithmetic to compare, not a solver's tolerance)."""
    torch.manual_seed(0)
    model = get_cls_net(load_config(FMNIST, ["MODEL.STATE_LAYOUT", state_layout, "MODEL.DROPOUT", 0.0])).train()
    exact = copy.deepcopy(model).double()
    exact.state_layout = "nchw"
    x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
    grads = []
    for net, images in ((exact, x.double()), (model, x)):
        F.cross_entropy(net(images, mode="unrolled", depth=3), y).backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
    scale = max(g.norm().item() for g in grads[0].values())
    assert len(grads[0]) > 80 and all(g is not None for g in grads[1].values())
    for name, g in grads[0].items():
        # relative to the gradient, or to 1e-4 of the largest one where it is ~0 (a bias before a norm)
        err = (grads[1][name].double() - g).norm().item() / max(g.norm().item(), 1e-4 * scale)
        assert err < 5e-3, (name, err)
