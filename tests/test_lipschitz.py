"""The Lipschitz MDEQ (docs/lipschitz.md): the parts' constants against exact values, the certified bound
against the empirical one on digits images, the predicted linear rate of plain iteration, the cap after
optimiser steps that try to grow the weights, a short training run that logs the bound, the config rules."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import ConfigError, load_config
from mdeq.config.validation import apriori_steps
from mdeq.datasets.digits import digits_tensors
from mdeq.models import get_cls_net
from mdeq.models.mdeq_core import MDEQModule
from mdeq.modules import (CenteredGroupNorm, SpectralCapConv2d, conv_operator_norm, jacobian_operator_norm,
                          nearest_upsample_gain, weights_fixed)
from mdeq.modules.lipschitz import conv_adjoint
from mdeq.solvers import fixed_point

CFG = "experiments/digits/cls_mdeq_digits_lipschitz.yaml"


def _dense(fn, shape) -> torch.Tensor:
    """The matrix of the linear map ``fn`` on inputs of ``shape``, (out numel, in numel): its images of the
    standard basis."""
    n = int(torch.Size(shape).numel())
    return fn(torch.eye(n).view(n, *shape)).flatten(1).T


@pytest.mark.parametrize("stride, hw", [(1, (6, 6)), (2, (7, 5)), (2, (8, 8))])
def test_conv_operator_norm_is_the_dense_matrix_norm_at_that_resolution(stride, hw):
    torch.manual_seed(1)
    w = torch.randn(3, 2, 3, 3)
    conv = lambda x: F.conv2d(x, w, stride=stride, padding=1)  # noqa: E731
    exact = float(torch.linalg.matrix_norm(_dense(conv, (2, *hw)), ord=2))
    # the two largest singular values lie within 0.3 % for stride 1: slow convergence from below
    estimate, v = conv_operator_norm(w, (2, *hw), stride, 1, iters=1000)
    assert estimate == pytest.approx(exact, rel=1e-4) and estimate <= exact * (1 + 1e-5)
    # conv_adjoint is the transpose of that matrix, also where a strided conv misses the last row/column
    u = torch.randn(1, 3, *conv(v).shape[-2:])
    assert float((conv(v) * u).sum()) == pytest.approx(float((v * conv_adjoint(u, w, hw, stride, 1)).sum()), rel=1e-5)
    # and it is not the spectral norm of the reshaped kernel matrix
    assert abs(float(torch.linalg.matrix_norm(w.flatten(1), ord=2)) - exact) > 1e-3 * exact


def test_nearest_upsampling_and_centred_groupnorm_gains_are_exact():
    for small, big in (((4, 4), (8, 8)), ((3, 3), (5, 6)), ((2, 2), (8, 8))):
        up = lambda x: F.interpolate(x, size=big, mode="nearest")  # noqa: E731
        assert nearest_upsample_gain(small, big) == pytest.approx(
            float(torch.linalg.matrix_norm(_dense(up, (1, *small)), ord=2)), rel=1e-6)
    gn = CenteredGroupNorm(2, 4, gamma_max=0.8)
    with torch.no_grad():
        gn.weight.copy_(torch.tensor([0.3, -2.0, 0.5, 0.1]))   # -2 is clipped to -0.8
    dense = _dense(lambda x: gn(x) - gn.bias.view(1, -1, 1, 1), (4, 3, 3))
    assert gn.gain() == pytest.approx(0.8) == pytest.approx(float(torch.linalg.matrix_norm(dense.detach(), ord=2)),
                                                             rel=1e-5)


def _lipschitz_model(*opts: str):
    cfg = load_config(CFG, list(opts))
    return cfg, get_cls_net(cfg)


def _grow_weights(model, steps: int = 40, lr: float = 0.03, cert_every: int = 5) -> float:
    """Adam steps (15x the digits learning rate) on every parameter of f that push the effective weights and
    the GroupNorm scales up, with the certificate every ``cert_every`` steps as the trainer's logged steps
    have it; returns the factor by which the weight-norm scales g grew."""
    f = model.fullstage
    g0 = sum(float(p.detach().abs().sum()) for n, p in f.named_parameters() if n.endswith("weight_g"))
    opt = torch.optim.Adam(f.parameters(), lr=lr)
    model.train()
    for step in range(1, steps + 1):
        opt.zero_grad()
        loss = -sum(m.weight.norm() for _, m in f.capped_convs())
        loss = loss - sum(m.weight.sum() for m in f.modules() if isinstance(m, CenteredGroupNorm))
        loss.backward()
        opt.step()
        if step % cert_every == 0:
            model.lipschitz_certificate()
    model.eval()
    return sum(float(p.detach().abs().sum()) for n, p in f.named_parameters() if n.endswith("weight_g")) / g0


@pytest.fixture(scope="module")
def grown():
    torch.manual_seed(0)
    cfg, model = _lipschitz_model()
    growth = _grow_weights(model)
    return cfg, model, growth


def test_the_cap_holds_after_optimiser_steps_that_grow_the_weights(grown):
    cfg, model, growth = grown
    assert growth > 3   # the optimiser did grow W = g v / ||v||
    f = model.fullstage
    for name, conv in f.capped_convs():
        exact = conv_operator_norm(conv.weight_no_update(), conv.in_shape, conv.stride, conv.padding, iters=300)[0]
        assert exact <= conv.cap * 1.01, name             # the parametrisation caps the operator norm
        assert exact >= conv.cap * 0.9, name              # and the growth reached it
    assert all(m.gain() <= cfg.MODEL.LIPSCHITZ.GN_GAMMA_MAX for m in f.modules() if isinstance(m, CenteredGroupNorm))
    cert = model.lipschitz_certificate()
    assert 0.8 * cfg.MODEL.LIPSCHITZ.TARGET < cert.bound < cfg.MODEL.LIPSCHITZ.TARGET < 1


def _problem(model, x):
    with weights_fixed(model.fullstage):
        return model.equilibrium_problem(model.injection(x))


def test_certified_bound_is_below_target_and_above_the_empirical_one_on_digits(grown):
    cfg, model, _ = grown
    x, _ = digits_tensors(32)
    cert = model.lipschitz_certificate().bound
    empirical = model.lipschitz_empirical(x[:24], iters=30)
    assert cert < cfg.MODEL.LIPSCHITZ.TARGET
    assert (empirical <= cert).all() and float(empirical.max()) > 0.3 * cert


def test_the_jacobian_norm_estimate_is_the_dense_jacobians_norm():
    torch.manual_seed(2)
    a, b = torch.randn(12, 12) / 4, torch.randn(3, 12)
    f = lambda z: torch.tanh(z @ a + b)  # noqa: E731  (block-diagonal over the batch of 3)
    z = torch.randn(3, 12)
    estimate = jacobian_operator_norm(f, z, iters=200)
    for i in range(3):
        jac = torch.func.jacrev(lambda t: torch.tanh(t @ a + b[i]))(z[i])
        assert float(estimate[i]) == pytest.approx(float(torch.linalg.matrix_norm(jac, ord=2)), rel=1e-3)


def test_plain_iteration_converges_at_the_certified_rate_forward_and_adjoint(grown):
    cfg, model, _ = grown
    x, _ = digits_tensors(32)
    cert = model.lipschitz_certificate().bound
    with torch.no_grad():
        problem = _problem(model, x[:4])
        z_star = fixed_point(problem.f, problem.z0, 200, eps=0.0).z
        z, err0 = problem.z0, (problem.z0 - z_star).norm(dim=1)
        k = apriori_steps(cfg.MODEL.LIPSCHITZ.TARGET, 1e-3)
        for step in range(1, k + 1):
            z = problem.f(z)
            assert ((z - z_star).norm(dim=1) <= cert ** step * err0 * (1 + 1e-4) + 1e-6).all(), step
        assert ((z - z_star).norm(dim=1) <= 1e-3 * err0).all()   # the a-priori count reached the tolerance
    # the adjoint iteration w <- J^T w + v contracts at the same rate
    with torch.enable_grad():
        z_in = z_star.detach().requires_grad_(True)
        fz = problem.f(z_in)
        v = torch.randn_like(fz)
        vjp = lambda w: torch.autograd.grad(fz, z_in, w, retain_graph=True)[0]  # noqa: E731
        w_star = torch.zeros_like(v)
        for _ in range(200):
            w_star = vjp(w_star) + v
        w = torch.zeros_like(v)
        err0 = (w - w_star).norm(dim=1)
        for step in range(1, 30):
            w = vjp(w) + v
            assert ((w - w_star).norm(dim=1) <= cert ** step * err0 * (1 + 1e-4) + 1e-6).all(), step


def test_apriori_steps_and_the_budgets_of_the_model():
    assert apriori_steps(0.9, 1e-3) == 66 and apriori_steps(0.5, 1e-3) == 10 and apriori_steps(0.5, 0.5) == 1
    assert 0.9 ** 66 <= 1e-3 < 0.9 ** 65
    _, model = _lipschitz_model("MODEL.B_EPS", "1e-4")
    assert (model.f_thres, model.b_thres) == (66, 88)
    _, model = _lipschitz_model("MODEL.LIPSCHITZ.APRIORI_STEPS", "False")
    assert (model.f_thres, model.b_thres) == (12, 12)


def test_a_short_training_logs_the_certified_bound_below_one_at_every_logged_step(tmp_path):
    from mdeq.programs.classification import train
    res = train(["--cfg", CFG, "OUTPUT_DIR", str(tmp_path / "out"), "LOG_DIR", str(tmp_path / "log"),
                 "PERCENT", "0.15", "TRAIN.END_EPOCH", "1", "TRAIN.PRETRAIN_STEPS", "2", "PRINT_FREQ", "1",
                 "TRAIN.BATCH_SIZE_PER_GPU", "32", "MODEL.LIPSCHITZ.EMPIRICAL_ITERS", "10"])
    out = tmp_path / "out" / "digits" / "cls_mdeq_digits_lipschitz"
    log = next(out.glob("*_train_*.log")).read_text()
    steps = [float(line.rsplit(" ", 1)[1]) for line in log.splitlines() if " lipschitz_certified " in line
             and "] step" not in line and "epoch 0 (" not in line]
    assert len(steps) == res["global_step"] >= 7        # 225 images in batches of 32
    assert all(0 < b < 0.9 for b in steps)
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    train_figures = history[-1]["train"]
    assert 0 < train_figures["lipschitz_empirical"] <= train_figures["lipschitz_certified"] < 0.9
    assert "mode=equilibrium f_steps=" in log and "b_steps=" in log


def test_the_flag_off_model_is_the_original():
    cfg = load_config("experiments/digits/cls_mdeq_digits.yaml")
    model = get_cls_net(cfg)
    assert type(model.fullstage) is MDEQModule and not model.lipschitz
    assert not any("power_v" in k or "fuse_logits" in k for k in model.state_dict())
    assert not any(isinstance(m, SpectralCapConv2d) for m in model.modules())
    with pytest.raises(ValueError, match="MODEL.LIPSCHITZ.ENABLED"):
        model.lipschitz_certificate()


@pytest.mark.parametrize("opts, match", [
    (["MODEL.LIPSCHITZ.TARGET", "1.0"], r"MODEL.LIPSCHITZ.TARGET = 1.0 is out of range"),
    (["MODEL.LIPSCHITZ.ALPHA", "0.0"], r"MODEL.LIPSCHITZ.ALPHA = 0.0 is out of range"),
    (["MODEL.DROPOUT", "0.1"], r"MODEL.DROPOUT = 0.1 with MODEL.LIPSCHITZ.ENABLED"),
    (["MODEL.F_SOLVER", "broyden"], r"MODEL.F_SOLVER = 'broyden' with MODEL.LIPSCHITZ.APRIORI_STEPS"),
    (["MODEL.F_EPS", "0.0"], r"MODEL.F_EPS = 0.0 with MODEL.LIPSCHITZ.APRIORI_STEPS"),
])
def test_config_errors_name_the_key(opts, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CFG, opts)


def test_an_unreachable_target_is_an_error_naming_the_keys():
    with pytest.raises(ConfigError, match="TARGET 0.3 cannot be met with ALPHA 0.5, BETA 0.3"):
        _lipschitz_model("MODEL.LIPSCHITZ.TARGET", "0.3")
    with pytest.raises(ValueError, match="got \\(30, 30\\)"):
        _lipschitz_model()[1](torch.zeros(1, 3, 60, 60))


def test_the_fashion_mnist_lipschitz_comparison_loads_and_keeps_the_released_schedule(repo):
    from mdeq.analysis.cost_comparison import BENCHMARKS
    make_variants, baseline = BENCHMARKS["fashion_mnist_lipschitz"]
    variants = make_variants(repo)
    assert variants[0].name == baseline
    released = load_config("experiments/fashion_mnist/cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1.yaml")
    lipschitz = load_config("experiments/fashion_mnist/cls_mdeq_fmnist_lipschitz.yaml")
    for key in ("SEED", "TRAIN", "DATASET"):
        assert lipschitz[key] == released[key], key
    assert lipschitz.MODEL.LIPSCHITZ.ENABLED and lipschitz.MODEL.LIPSCHITZ.APRIORI_STEPS
    for v in variants:
        cfg = load_config(v.cfg, list(v.opts))
        assert cfg.TRAIN.END_EPOCH == 5 and cfg.MODEL.LIPSCHITZ.ENABLED == ("Lipschitz" in v.name)


def test_the_lipschitz_f_is_refused_where_it_cannot_be_certified():
    from mdeq.models import get_seg_net
    with pytest.raises(ConfigError, match="MODEL.LIPSCHITZ.ENABLED = True does not apply to MODEL.NAME 'resnet'"):
        get_cls_net(load_config(CFG, ["MODEL.NAME", "resnet"]))
    with pytest.raises(ConfigError, match="MODEL.LIPSCHITZ.ENABLED applies to classification only"):
        get_seg_net(load_config(CFG))
    unrolled = get_cls_net(load_config(CFG, ["MODEL.NAME", "mdeq_unrolled"]))
    assert unrolled.lipschitz and unrolled.lipschitz_certificate().bound < 0.9
