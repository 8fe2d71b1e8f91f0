"""The evaluation copy (mdeq.models.inference): BatchNorm folded into its convolutions and channels-last
layers outside f give the outputs of the model itself, and leave the model as it was."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from mdeq.config import load_config
from mdeq.models import get_cls_net, get_seg_net
from mdeq.models.inference import evaluation_model, fold_batchnorm, inference_model
from mdeq.models.resnet import ResNetClsNet

FMNIST = "experiments/fashion_mnist/cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1.yaml"


def _batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def _trained_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from their initial values (else folding is the identity)."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
    return model.eval()


def test_resnet_copy_folds_every_batchnorm_and_keeps_the_logits():
    model = _trained_statistics(ResNetClsNet(8, [6, 8, 12], in_channels=1, num_classes=10))
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        ref = model(x)
        fast = inference_model(model)
        out = fast(x)
    assert _batchnorms(model) == 9 and _batchnorms(fast) == 0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    # the model itself is untouched
    assert _batchnorms(model) == 9 and model.stages[0][0].conv1.weight.is_contiguous()


def test_folding_needs_eval_mode():
    model = ResNetClsNet(8, [4, 4, 4], in_channels=1, num_classes=3).train()
    with pytest.raises(ValueError, match="eval"):
        fold_batchnorm(model)


def test_mdeq_copy_keeps_the_logits_and_leaves_f_in_its_own_layout():
    cfg = load_config(FMNIST, ["TEST.F_THRES", "4"])
    model = _trained_statistics(get_cls_net(cfg))
    bns = _batchnorms(model)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        ref = model(x, eps=0.0)
        fast = inference_model(model)
        out = fast(x, eps=0.0)
    assert bns > 10 and _batchnorms(fast) == 0 and _batchnorms(model) == bns
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    stem = fast.full_res_stem[3].conv1     # 16 to 16 channels: the layouts differ
    assert stem.weight.is_contiguous(memory_format=torch.channels_last) and not stem.weight.is_contiguous()
    assert stem.bias is not None           # the folded BatchNorm's shift
    f_convs = [m for m in fast.fullstage.modules() if isinstance(m, nn.Conv2d)]
    assert f_convs and not any(c.weight.is_contiguous(memory_format=torch.channels_last)
                               and not c.weight.is_contiguous() for c in f_convs)


def test_segmentation_copy_folds_every_batchnorm():
    cfg = load_config("experiments/cityscapes/seg_mdeq_SMALL.yaml", [])
    model = _trained_statistics(get_seg_net(cfg))
    assert _batchnorms(model) > 0
    assert fold_batchnorm(inference_model(model, fold_bn=False, channels_last=False)) == _batchnorms(model)


def test_evaluation_model_follows_the_test_keys():
    cfg = load_config(FMNIST, ["TEST.FOLD_BN", "False", "TEST.CHANNELS_LAST", "False"])
    model = get_cls_net(cfg).train()
    assert evaluation_model(model, cfg) is model and not model.training
    cfg = load_config(FMNIST, ["TEST.FOLD_BN", "False"])
    copy = evaluation_model(model, cfg)
    assert copy is not model and _batchnorms(copy) == _batchnorms(model)
    assert not copy.full_res_stem[3].conv1.weight.is_contiguous()
