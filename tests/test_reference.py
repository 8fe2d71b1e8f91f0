"""Our MDEQ against recordings of the original implementation (tests/data/reference).

The model tests run on the ``device`` fixture's device (``pytest --device cuda``).
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import load_config
from mdeq.models import count_parameters, get_cls_net, get_seg_net
from mdeq.utils.checkpoint import CheckpointError, load_weights


def _to(value, device):
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value.to(device) if isinstance(value, torch.Tensor) else value


@pytest.fixture(scope="module")
def tiny(reference, repo, device):
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_TINY.yaml", ["MODEL.DROPOUT", 0.0])
    model = get_cls_net(cfg)
    load_weights(model, reference / "cifar_tiny.pkl")
    expected = torch.load(reference / "cifar_tiny.expected.pt", weights_only=True)
    return model.to(device), _to(expected, device)


def test_unrolled_logits_match_the_original(tiny):
    model, e = tiny
    model.eval()
    with torch.no_grad():
        logits, info = model(e["input"], mode="unrolled", return_info=True)
    assert (info.mode, info.f_steps, info.b_steps) == ("unrolled", 10, None)   # NUM_LAYERS of the original config
    assert (logits - e["unrolled_eval_logits"]).abs().max().item() < 1e-4


def test_equilibrium_logits_match_the_exact_fixed_point(tiny):
    model, e = tiny
    model.eval()
    with torch.no_grad():
        logits, info = model(e["input"], mode="equilibrium", f_thres=60, return_info=True)
    err = (logits - e["equilibrium_eval_logits"]).abs().max().item()
    assert info.mode == "equilibrium"
    assert info.f_steps <= 60
    assert err < 2e-3, f"max logit error {err:.3g} (rel residual {info.f_rel:.3g})"


def test_equilibrium_logits_stay_accurate_when_the_start_moves_by_float_noise(tiny):
    """Broyden on this model is sensitive: without its step safeguard, 1e-6 noise in z0 moved the
    logit error at 60 steps between 2e-3 and 1e-2. With it, 12 such starts landed between 4.5e-4
    and 1.1e-3 (and 3.6e-4 to 2.2e-3 with MODEL.STATE_LAYOUT channels_last, whose rounding differs:
    60 steps end while the residual still falls, rel ~1e-4)."""
    model, e = tiny
    model.eval()
    solver = model.f_solver
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        noise_scale = 1e-6

        @functools.wraps(solver)        # so that the model passes it the options of the solver it wraps
        def noisy_start(f, z0, threshold, **kw):
            noise = torch.randn(z0.shape, generator=gen).to(z0.device)
            return solver(f, z0 + noise_scale * noise, threshold, **kw)

        with torch.no_grad():
            logits, info = model(e["input"], f_thres=60, solver=(noisy_start, model.b_solver), return_info=True)
        assert info.f_steps == 60 or info.f_rel < 1e-5
        err = (logits - e["equilibrium_eval_logits"]).abs().max().item()
        assert err < 2e-3, f"max logit error {err:.3g} (rel residual {info.f_rel:.3g})"


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_implicit_gradients_match_the_exact_gradients(tiny, monkeypatch, layout):
    model, e = tiny
    monkeypatch.setattr(model, "state_layout", layout)
    model.train()
    model.zero_grad()
    logits, info = model(e["input"], f_thres=60, b_thres=60, return_info=True)
    loss = F.cross_entropy(logits, e["train_target"])
    loss.backward()
    ours, exact = [], []
    for name, p in model.named_parameters():
        assert name in e["train_grads"], name
        assert p.grad is not None, f"no gradient for {name}"
        ours.append(p.grad.flatten())
        exact.append(e["train_grads"][name].flatten())
    assert len(ours) == len(e["train_grads"])
    ours, exact = torch.cat(ours), torch.cat(exact)
    cos = F.cosine_similarity(ours, exact, dim=0).item()
    rel = ((ours - exact).norm() / exact.norm()).item()
    assert abs(loss.item() - e["train_loss"].item()) < 1e-3
    assert cos >= 0.999 and rel <= 1e-2, f"cosine {cos:.6f}, relative error {rel:.4f}"
    assert info.b_fallback is False
    # parameters before and inside the equilibrium get real gradients (the original gives zeros)
    assert model.fullstage.branches[0].blocks[0].conv1.weight_v.grad.abs().sum() > 0
    assert model.downsample[0].weight.grad.abs().sum() > 0


ORIGINAL_COUNTS = {
    "cifar/cls_mdeq_TINY.yaml": 158_986,
    "cifar/cls_mdeq_LARGE.yaml": 11_098_398,
    "imagenet/cls_mdeq_SMALL.yaml": 16_808_936,
    "imagenet/cls_mdeq_LARGE.yaml": 90_463_280,
    "imagenet/cls_mdeq_XL.yaml": 90_463_280,
    "cityscapes/seg_mdeq_SMALL.yaml": 8_968_467,
    "cityscapes/seg_mdeq_LARGE.yaml": 55_955_859,
    "cityscapes/seg_mdeq_XL.yaml": 79_551_755,
}


@pytest.mark.parametrize("name,count", sorted(ORIGINAL_COUNTS.items()))
def test_parameter_counts_equal_the_original(repo, name, count):
    cfg = load_config(repo / "experiments" / name)
    with torch.device("meta"):
        model = (get_seg_net if name.startswith("cityscapes") else get_cls_net)(cfg)
    assert count_parameters(model) == count


def test_paper_cifar_small_has_about_170k_parameters(repo):
    model = get_cls_net(load_config(repo / "experiments/cifar/cls_mdeq_SMALL_paper.yaml"))
    assert 150_000 <= count_parameters(model) <= 190_000


def test_loading_into_another_architecture_names_the_keys(reference, repo, tmp_path):
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_SMALL_paper.yaml")
    with pytest.raises(CheckpointError) as err:
        load_weights(get_cls_net(cfg), reference / "cifar_tiny.pkl")
    msg = str(err.value)
    assert "cifar_tiny.pkl" in msg and "missing in the checkpoint" in msg and "shape mismatches" in msg
    assert "fullstage.branches.2.blocks.0.conv1.weight_v" in msg  # a stream TINY does not have
    assert "classifier.weight: checkpoint (10, 200) vs model (10, 128)" in msg


def test_truncated_checkpoint_is_a_clear_error(reference, tmp_path):
    data = (reference / "cifar_tiny.pkl").read_bytes()
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_weights(torch.nn.Linear(1, 1), cut)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_both_state_layouts_are_the_original_model(reference, repo, layout, device):
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_TINY.yaml", ["MODEL.DROPOUT", 0.0, "MODEL.STATE_LAYOUT", layout])
    model = get_cls_net(cfg).eval()
    load_weights(model, reference / "cifar_tiny.pkl")
    model.to(device)
    e = _to(torch.load(reference / "cifar_tiny.expected.pt", weights_only=True), device)
    with torch.no_grad():
        assert (model(e["input"], train_step=0) - e["unrolled_eval_logits"]).abs().max().item() < 1e-4
        problem = model.equilibrium_problem(model.injection(e["input"]))
        z = torch.randn_like(problem.z0)
        states = problem.unflatten(z)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert problem.channels_last == (layout == "channels_last")
    assert all(s.shape[1:] == shape and s[0].unsqueeze(0).is_contiguous(memory_format=fmt)
               for s, shape in zip(states, problem.shapes))
    assert torch.equal(problem.flatten(states), z)        # (B, D) -> states -> (B, D) is the identity


@pytest.mark.compile
def test_compiled_f_gives_the_eager_results(reference, repo, tiny, device):
    """MODEL.COMPILE True: unrolled and equilibrium logits as in eager mode (float tolerance), the
    same state-dict names, and implicit gradients as exact as eager ones (the adjoint solve runs
    its VJPs through the compiled graph, retained across calls)."""
    eager, e = tiny
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_TINY.yaml", ["MODEL.DROPOUT", 0.0, "MODEL.COMPILE", True])
    model = get_cls_net(cfg)
    load_weights(model, reference / "cifar_tiny.pkl")
    model.to(device)
    assert list(model.state_dict()) == list(eager.state_dict())
    # a compiled backward that donates its buffers refuses the adjoint solve's retain_graph=True VJPs
    assert torch._functorch.config.donated_buffer is False
    model.eval(), eager.eval()
    with torch.no_grad():
        unrolled = model(e["input"], mode="unrolled")
        assert (unrolled - eager(e["input"], mode="unrolled")).abs().max().item() < 1e-4
        assert (unrolled - e["unrolled_eval_logits"]).abs().max().item() < 1e-4
        logits = model(e["input"], f_thres=60)
        assert (logits - e["equilibrium_eval_logits"]).abs().max().item() < 2e-3
        assert (logits - eager(e["input"], f_thres=60)).abs().max().item() < 2e-3
    model.train()
    logits, info = model(e["input"], f_thres=60, b_thres=60, return_info=True)
    F.cross_entropy(logits, e["train_target"]).backward()
    ours = torch.cat([p.grad.flatten() for _, p in model.named_parameters()])
    exact = torch.cat([e["train_grads"][n].flatten() for n, _ in model.named_parameters()])
    cos = F.cosine_similarity(ours, exact, dim=0).item()
    rel = ((ours - exact).norm() / exact.norm()).item()
    assert cos >= 0.999 and rel <= 1e-2 and not info.b_fallback, (cos, rel)
