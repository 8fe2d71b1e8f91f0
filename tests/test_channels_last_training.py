"""TRAIN.CHANNELS_LAST (mdeq.models.layout): the layers outside f train with channels-last weights and
compute what the NCHW model computes, keep that layout through the optimizer's steps, and their
checkpoints load into either layout."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeq.config import load_config
from mdeq.core.trainer import fit
from mdeq.models import get_cls_net
from mdeq.models.mdeq_core import Activation
from mdeq.models.inference import inference_model
from mdeq.models.layout import channels_last_outside_f, training_layout
from mdeq.models.resnet import ResNetClsNet
from mdeq.tasks.classification import ClassificationTask
from mdeq.utils.checkpoint import load_checkpoint
from mdeq.utils.distributed import DistInfo

REPO = Path(__file__).resolve().parents[1]
FMNIST = REPO / "experiments/fashion_mnist/cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1.yaml"
DIGITS_RESNET = REPO / "experiments/digits/cls_resnet_digits.yaml"


def _channels_last(conv: nn.Conv2d) -> bool:
    """Channels-last and not also NCHW-contiguous (a 1x1 or 1-channel weight is both)."""
    w = conv.weight
    return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()


def test_only_the_convolutions_outside_f_change_layout():
    model = get_cls_net(load_config(FMNIST))
    f_convs = [m for m in model.fullstage.modules() if isinstance(m, nn.Conv2d)]
    outside = [m for m in model.modules() if isinstance(m, nn.Conv2d) and all(m is not c for c in f_convs)]
    assert channels_last_outside_f(model) == len(outside) > 0
    assert _channels_last(model.full_res_stem[3].conv1)
    assert f_convs and not any(_channels_last(c) for c in f_convs)
    resnet = ResNetClsNet(8, [6, 8, 12], in_channels=1, num_classes=10)
    convs = [m for m in resnet.modules() if isinstance(m, nn.Conv2d)]
    shortcuts = [c for c in convs if c.kernel_size == (1, 1) and c.stride == (2, 2)]
    assert len(convs) == 9 and len(shortcuts) == 2
    assert channels_last_outside_f(resnet) == 7
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not any(_channels_last(c) for c in shortcuts)           # (1x1: both layouts are contiguous)
    x = torch.randn(2, 6, 8, 8).contiguous(memory_format=torch.channels_last)
    assert shortcuts[0](x).is_contiguous()                          # their input goes in NCHW
    assert channels_last_outside_f(resnet) == 7 and len(shortcuts[0]._forward_pre_hooks) == 1   # idempotent
    copy_ = inference_model(resnet)             # evaluation runs no backward: no input conversion there
    assert not any(c._forward_pre_hooks for c in copy_.modules() if isinstance(c, nn.Conv2d))
    assert len(shortcuts[0]._forward_pre_hooks) == 1            # the trained model keeps its own
    cfg = load_config(FMNIST)
    assert training_layout(model := get_cls_net(cfg), cfg) is model and not _channels_last(model.full_res_stem[3].conv1)


def test_a_channels_last_training_step_is_the_nchw_one_and_keeps_its_layout():
    """Gradients included: the first stride-2 shortcut (1x1, 6 input channels) is where oneDNN's
    channels-last weight gradient goes wrong (see mdeq.models.layout)."""
    torch.manual_seed(0)
    nchw = ResNetClsNet(8, [6, 8, 12], in_channels=1, num_classes=10)
    last = copy.deepcopy(nchw)
    channels_last_outside_f(last)
    # SGD: its update is linear in the gradient (Adam's divides rounding noise of near-zero gradients
    # by their own size, so two layouts part after a few steps without either being wrong)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (nchw, last)]
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    for _ in range(3):
        losses = []
        for model, opt in zip((nchw, last), opts):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
        for (name, p), q in zip(nchw.named_parameters(), last.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
        for opt in opts:
            opt.step()
        assert abs(losses[0] - losses[1]) < 1e-5 * max(1.0, abs(losses[0]))
    for (name, p), q in zip(nchw.named_parameters(), last.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    convs = [m for m in last.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert sum(_channels_last(c) for c in convs) == 6          # the 3x3 ones (the stem has 1 input channel)
    # a channels-last state dict loads into an NCHW model and gives its outputs
    fresh = ResNetClsNet(8, [6, 8, 12], in_channels=1, num_classes=10)
    fresh.load_state_dict(last.state_dict())
    assert not any(_channels_last(c) for c in fresh.modules() if isinstance(c, nn.Conv2d))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), last.eval()(x), rtol=1e-4, atol=1e-5)


def test_training_runs_in_the_layout_of_train_channels_last_and_resumes_in_the_other(tmp_path):
    """A run with TRAIN.CHANNELS_LAST saves channels-last weights; resumed without it, the run goes on
    in NCHW from the same values."""
    opts = ["PERCENT", 0.05, "TRAIN.BATCH_SIZE_PER_GPU", 16, "TRAIN.END_EPOCH", 1, "TRAIN.CHANNELS_LAST", True]
    fit(ClassificationTask(), load_config(DIGITS_RESNET, opts), DistInfo(), str(tmp_path), str(tmp_path / "tb"))
    saved = load_checkpoint(tmp_path / "checkpoint.pth.tar")["model"]
    convs = [k for k, v in saved.items() if v.dim() == 4]
    assert convs and all(saved[k].is_contiguous(memory_format=torch.channels_last) for k in convs)
    assert any(not saved[k].is_contiguous() for k in convs)
    opts = opts[:-1] + [False, "TRAIN.END_EPOCH", 2, "TRAIN.RESUME", True]
    fit(ClassificationTask(), load_config(DIGITS_RESNET, opts), DistInfo(), str(tmp_path), str(tmp_path / "tb"))
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    resumed = ckpt["model"]
    assert ckpt["epoch"] == 2
    assert all(resumed[k].is_contiguous() for k in convs)
    assert any(not torch.equal(resumed[k], saved[k]) for k in convs)    # it trained on


def test_model_cost_times_the_step_in_the_layout_the_config_trains_in(monkeypatch):
    import mdeq.analysis.benchmark.model_cost as cost
    seen = []
    real = nn.Conv2d._conv_forward

    def record(self, x, w, b):
        if torch.is_grad_enabled():         # the training steps (inference runs without autograd)
            seen.append(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous())
        return real(self, x, w, b)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", record)
    threads = torch.get_num_threads()
    try:
        for on in (False, True):
            seen.clear()
            row = cost.model_cost_worker(cost.CostSpec(str(DIGITS_RESNET), ["TRAIN.CHANNELS_LAST", on,
                                                                            "TRAIN.BATCH_SIZE_PER_GPU", 8],
                                                       threads=1, infer_batch=4, repeats=1))
            assert row["train_channels_last"] is on and seen and any(seen) == on
    finally:
        torch.set_num_threads(threads)


def _grads_and_relu_masks(net: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Each parameter's gradient of the loss through 3 applications of f, and where each ReLU passed."""
    masks = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: masks.append(out.detach() > 0))
             for m in net.modules() if isinstance(m, (nn.ReLU, Activation))]
    try:
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x.to(next(net.parameters()).dtype), mode="unrolled", depth=3), y).backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: p.grad.double() for n, p in net.named_parameters()}, masks


@pytest.mark.parametrize("state_layout, train_channels_last", [("channels_last", True), ("nchw", True),
                                                               ("channels_last", False), ("nchw", False)])
def test_every_gradient_of_the_released_network_is_the_float64_nchw_one(state_layout, train_channels_last):
    """At the released Fashion-MNIST network's shapes, in each layout a training can take, every
    parameter's float32 gradient (through 3 applications of f: exact arithmetic to compare, not a
    solver's tolerance) is the float64 NCHW one to float32 rounding, wherever the two runs' ReLUs
    decide alike. (A pre-activation within rounding of 0 can fall on either side in float32, in any
    layout, and then moves the gradients of everything before it by up to 1 %: such a batch is
    redrawn.) No layout-specific kernel (oneDNN's, see mdeq.models.layout) silently changes a gradient."""
    torch.manual_seed(0)
    cfg = load_config(FMNIST, ["MODEL.STATE_LAYOUT", state_layout, "MODEL.DROPOUT", 0.0])
    model = get_cls_net(cfg).train()
    exact = copy.deepcopy(model).double()
    exact.state_layout = "nchw"
    if train_channels_last:
        channels_last_outside_f(model)
    for _ in range(5):
        x, y = torch.randn(6, 1, 28, 28), torch.randint(0, 10, (6,))
        (ref, ref_masks), (got, masks) = _grads_and_relu_masks(exact, x, y), _grads_and_relu_masks(model, x, y)
        if len(masks) == len(ref_masks) and all(torch.equal(a, b) for a, b in zip(masks, ref_masks)):
            break
    else:
        pytest.fail("every batch drawn had a ReLU decided differently in float32 and float64")
    scale = max(g.norm().item() for g in ref.values())
    assert len(ref) > 80 and len(masks) > 10
    for name, g in ref.items():
        # relative to the gradient, or to 1e-4 of the largest one where it is ~0 (a bias before a norm)
        err = (got[name] - g).norm().item() / max(g.norm().item(), 1e-4 * scale)
        assert err < 1e-3, (name, err)
