"""Training cost (issue 14): the Hutchinson Jacobian estimate, phantom / Jacobian-free gradients, the
Jacobian regulariser's schedule, the spectral-radius estimate and the forward-budget sweep."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from mdeq.config import ConfigError, load_config
from mdeq.core.regularization import JacobianRegularizer
from mdeq.models import get_cls_net
from mdeq.modules import attach_implicit_backward, attach_phantom_backward, hutchinson_jac_loss, spectral_radius
from mdeq.solvers import get_solver

DIGITS = "experiments/digits/cls_mdeq_digits.yaml"


class SmallMap(nn.Module):
    """f(z) = tanh(W z + U x), contractive for a small ||W||: (B, D) -> (B, D)."""

    def __init__(self, dim: int = 6, scale: float = 0.5) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        w = torch.randn(dim, dim, generator=g, dtype=torch.float64)
        self.W = nn.Parameter(scale * w / torch.linalg.matrix_norm(w, 2))
        self.U = nn.Parameter(torch.randn(dim, dim, generator=g, dtype=torch.float64))
        self.x = torch.randn(3, dim, generator=g, dtype=torch.float64)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.x @ self.U.T)


def _equilibrium(f: SmallMap) -> torch.Tensor:
    with torch.no_grad():
        return get_solver("broyden")(f, torch.zeros_like(f.x), 60, eps=1e-12, stop_mode="abs").z


def _grads(f: SmallMap, z: torch.Tensor) -> torch.Tensor:
    f.zero_grad()
    (z * torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)).sum().backward()
    return torch.cat([f.W.grad.flatten(), f.U.grad.flatten()]).clone()


def test_hutchinson_mean_matches_the_dense_frobenius_norm():
    f = SmallMap(scale=1.5)
    z_in = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    z_out = f(z_in)
    # the dense Jacobian of the whole batch (block-diagonal), its squared Frobenius norm per element of z
    dense = torch.autograd.functional.jacobian(f, z_in.detach()).reshape(z_in.numel(), z_in.numel())
    exact = dense.pow(2).sum().item() / z_in.numel()
    g = torch.Generator().manual_seed(3)
    samples = torch.stack([hutchinson_jac_loss(z_in, z_out, 1, generator=g).detach() for _ in range(2000)])
    se = samples.std().item() / math.sqrt(samples.numel())
    assert abs(samples.mean().item() - exact) < 3.5 * se, (samples.mean().item(), exact, se)
    assert samples.std().item() > 0  # it is an estimate, not the exact value in disguise
    # the term has a graph in the parameters (what the regulariser trains)
    est = hutchinson_jac_loss(z_in, z_out, 4, generator=g)
    (gw,) = torch.autograd.grad(est, f.W)
    assert gw.abs().sum() > 0


def test_phantom_with_many_undamped_steps_approaches_the_implicit_gradient():
    f = SmallMap(scale=0.5)
    z_star = _equilibrium(f)
    solver = get_solver("broyden")
    implicit = _grads(f, attach_implicit_backward(f, z_star, solver, 60, eps=1e-12, stop_mode="abs"))
    phantom = _grads(f, attach_phantom_backward(f, z_star, steps=40, tau=1.0))
    few = _grads(f, attach_phantom_backward(f, z_star, steps=1, tau=1.0))
    cos = torch.nn.functional.cosine_similarity(implicit, phantom, dim=0).item()
    cos_few = torch.nn.functional.cosine_similarity(implicit, few, dim=0).item()
    assert cos >= 0.999, cos
    assert cos_few < cos  # more steps do get closer: the comparison can tell them apart
    assert torch.allclose(implicit, phantom, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("run_backward", [False, True])
def test_implicit_backward_leaves_no_graph_behind(run_backward):
    """The graph of f(z*) (and the adjoint hook with it) is freed as soon as nothing refers to the output,
    by reference counting alone: with a backward (a training step) and without one (a skipped step).
    A hook on f(z*) itself that refers to f(z*) made a cycle through autograd's nodes, and every step's
    graph of f stayed in memory."""
    import gc
    import weakref
    f = SmallMap(scale=0.5)
    z_star = _equilibrium(f)
    outputs = []

    def recorded(z: torch.Tensor) -> torch.Tensor:
        out = f(z)
        outputs.append(weakref.ref(out))
        return out

    gc.disable()
    try:
        z = attach_implicit_backward(recorded, z_star, get_solver("broyden"), 20, eps=1e-10, stop_mode="abs")
        if run_backward:
            z.sum().backward()
        assert outputs[0]() is not None
        del z
        assert outputs[0]() is None, "the graph of f(z*) outlived the output"
    finally:
        gc.enable()


def test_one_phantom_step_is_exactly_the_one_step_gradient():
    f = SmallMap(scale=0.9)
    z_star = _equilibrium(f)
    one = _grads(f, attach_phantom_backward(f, z_star, steps=1, tau=1.0))
    plain = _grads(f, f(z_star.detach()))
    assert torch.equal(one, plain)
    damped = _grads(f, attach_phantom_backward(f, z_star, steps=1, tau=0.5))
    assert torch.allclose(damped, 0.5 * plain, rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad", [("PHANTOM_STEPS", 0), ("PHANTOM_TAU", 1.5), ("PHANTOM_TAU", 0.0),
                                 ("GRAD", "unroll"), ("JAC_LOSS_FREQ", 2.5), ("JAC_LOSS_FREQ", 0.0),
                                 ("JAC_LOSS_WEIGHT", -1.0), ("JAC_PROBES", 0)])
def test_bad_training_cost_keys_are_config_errors(repo, bad):
    key, value = bad
    with pytest.raises(ConfigError, match=f"MODEL.{key}"):
        load_config(repo / DIGITS, [f"MODEL.{key}", value])


def _digits_net(repo, *opts):
    cfg = load_config(repo / DIGITS, ["MODEL.F_THRES", 6, "MODEL.B_THRES", 6, *opts])
    torch.manual_seed(0)
    return get_cls_net(cfg)


def _count_graph_applications(net) -> list:
    calls = []
    net.fullstage.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    return calls


@pytest.mark.parametrize("train_step", [0, 10 ** 6])  # warm-up and equilibrium
def test_jac_loss_adds_no_second_forward_graph(repo, train_step):
    x = torch.randn(4, 3, 32, 32)
    counts = {}
    for jac in (False, True):
        net = _digits_net(repo)
        calls = _count_graph_applications(net)
        out, info = net(x, train_step=train_step, jac_loss=jac, return_info=True)
        loss = out.logsumexp(1).mean()
        if jac:
            assert info.jac_loss is not None and info.jac_loss.requires_grad
            assert info.scalars()["jac_loss"] == pytest.approx(info.jac_loss.item())
            loss = loss + info.jac_loss
        else:
            assert info.jac_loss is None and "jac_loss" not in info.scalars()
        loss.backward()
        counts[jac] = sum(calls)  # applications of f with autograd on
    assert counts[True] == counts[False] == (6 if train_step == 0 else 1)


def test_jac_loss_is_not_computed_without_autograd(repo):
    net = _digits_net(repo)
    with torch.no_grad():
        _, info = net(torch.randn(2, 3, 32, 32), jac_loss=True, return_info=True)
    assert info.jac_loss is None and info.f_steps > 0


def test_jfb_mode_equals_one_undamped_phantom_step(repo):
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    grads = {}
    for opts in (("MODEL.GRAD", "jfb"), ("MODEL.GRAD", "phantom", "MODEL.PHANTOM_STEPS", 1, "MODEL.PHANTOM_TAU", 1.0)):
        net = _digits_net(repo, *opts)
        logits, info = net(x, train_step=10 ** 6, return_info=True)
        assert info.b_steps == 1   # set by the forward: no adjoint solve to wait for
        nn.functional.cross_entropy(logits, y).backward()
        grads[opts[1]] = torch.cat([p.grad.flatten() for p in net.fullstage.parameters()])
    assert torch.equal(grads["jfb"], grads["phantom"])
    implicit = _digits_net(repo)
    nn.functional.cross_entropy(implicit(x, train_step=10 ** 6), y).backward()
    g_imp = torch.cat([p.grad.flatten() for p in implicit.fullstage.parameters()])
    assert not torch.allclose(g_imp, grads["jfb"])  # the modes really differ


def test_regularizer_schedule_is_deterministic_and_honours_the_frequency():
    reg = JacobianRegularizer(weight=2.0, freq=0.25, incremental=0.5, seed=7)
    picks = [reg.active(s) for s in range(4000)]
    assert picks == [JacobianRegularizer(2.0, 0.25, 0.5, 7).active(s) for s in range(4000)]
    assert abs(sum(picks) / 4000 - 0.25) < 0.03
    assert picks != [JacobianRegularizer(2.0, 0.25, 0.5, 8).active(s) for s in range(4000)]
    periodic = JacobianRegularizer(weight=1.0, freq=3)
    assert [periodic.active(s) for s in range(7)] == [True, False, False, True, False, False, True]
    assert not JacobianRegularizer(weight=0.0).active(0)
    assert reg.weight(0) == 2.0 and reg.weight(3) == 3.5


def test_regularizer_adds_the_weighted_term():
    from mdeq.modules import EquilibriumInfo
    info = EquilibriumInfo(mode="equilibrium", jac_loss=torch.tensor(0.5, requires_grad=True))
    loss = torch.tensor(1.0)
    reg = JacobianRegularizer(weight=2.0)
    total = reg.add(loss, info, epoch=0)
    assert total.item() == pytest.approx(2.0) and total.requires_grad
    assert reg.add(loss, EquilibriumInfo(mode="equilibrium"), epoch=0) is loss
    assert reg.add(loss, None, epoch=0) is loss
    assert JacobianRegularizer(weight=0.0).add(loss, info, epoch=0) is loss
    assert JacobianRegularizer(weight=1.0, incremental=0.25).add(loss, info, epoch=2).item() == pytest.approx(1.75)


def test_spectral_radius_of_a_linear_map():
    q, _ = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64))
    eig = torch.tensor([0.9, -0.5, 0.3, 0.1, 0.05], dtype=torch.float64)
    a = q @ torch.diag(eig) @ q.T  # symmetric: the power method converges to |lambda_max| = 0.9
    z = torch.randn(2, 5, dtype=torch.float64)
    rho = spectral_radius(lambda v: v @ a.T, z, iters=60)
    assert rho.shape == (2,)
    assert torch.allclose(rho.double(), torch.full((2,), 0.9, dtype=torch.float64), atol=1e-3)


# ------------------------------------------------------------------------------------------- sweep
def test_sweep_on_the_reference_checkpoint_has_falling_residuals(reference, repo, tmp_path):
    from mdeq.analysis.sweep import format_sweep_table, plot_sweep, run_sweep
    from mdeq.utils.checkpoint import load_weights
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_TINY.yaml", ["MODEL.DROPOUT", 0.0])
    model = get_cls_net(cfg)
    load_weights(model, reference / "cifar_tiny.pkl")
    model.eval()
    e = torch.load(reference / "cifar_tiny.expected.pt", weights_only=True)

    def evaluate(t: int):
        with torch.no_grad():
            logits, info = model(e["input"], f_thres=t, return_info=True)
        return {"top1": 100.0 * (logits.argmax(1) == e["labels"]).float().mean().item(), **info.stats()}

    rows = run_sweep(evaluate, [2, 4, 8, 16, 32])
    res = [r.rel_residual for r in rows]
    assert all(b < a for a, b in zip(res, res[1:])), res
    assert rows[0].f_steps == 2 and rows[-1].f_steps <= 32
    table = format_sweep_table({"cifar_tiny.pkl": rows}, "top-1 (%)")
    assert table.count("\n") == 6 and "| cifar_tiny.pkl | 32 |" in table
    png = plot_sweep({"a": rows, "b": rows[:3]}, str(tmp_path / "s.png"), "top-1 (%)")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_parse_budgets_errors():
    from mdeq.analysis.sweep import parse_budgets
    assert parse_budgets("2,4, 8") == [2, 4, 8]
    for bad in ("2,x", "0,4", ""):
        with pytest.raises(ValueError, match="--f-thres-sweep"):
            parse_budgets(bad)


def test_seg_test_sweep_writes_table_plot_and_rows(repo, tmp_path, monkeypatch):
    import json
    from conftest import SEG_CFG, SEG_TINY, build_cityscapes_tree
    from mdeq.programs import segmentation as seg_programs
    from mdeq.models import get_seg_net
    from mdeq.utils.checkpoint import save_checkpoint
    monkeypatch.chdir(repo)
    root = build_cityscapes_tree(tmp_path / "data")
    opts = ["DATASET.ROOT", str(root), *SEG_TINY]
    files = []
    for seed in (0, 1):  # two checkpoints: two curves
        torch.manual_seed(seed)
        net = get_seg_net(load_config(repo / SEG_CFG, opts))
        files.append(str(tmp_path / f"m{seed}.pth"))
        save_checkpoint(net.state_dict(), files[-1])
    out = tmp_path / "out"
    rows = seg_programs.test(["--cfg", SEG_CFG, "--modelDir", str(out), "--logDir", str(tmp_path / "log"),
                              "--testModel", ",".join(files), "--f-thres-sweep", "1,3", *opts])
    assert list(rows) == files
    for r in rows.values():
        assert [x["budget"] for x in r] == [1, 3] and 0.0 <= r[0]["metric"] <= 100.0
        assert r[0]["f_steps"] == 1 and r[1]["rel_residual"] < r[0]["rel_residual"]
    folder = out / "cityscapes" / "seg_mdeq_SMALL"
    assert (folder / "f_thres_sweep.png").stat().st_size > 0
    assert json.loads((folder / "f_thres_sweep.json").read_text()) == rows


# ------------------------------------------------------------------------------------------- benchmark
def test_benchmark_backward_mode_rows_count_the_evaluations(repo):
    from mdeq.analysis.benchmark import BACKWARD_MODES, BenchSpec, backward_mode_worker, format_backward_modes
    spec = BenchSpec(cfg=str(repo / DIGITS), opts=["MODEL.PHANTOM_STEPS", 3], batch_size=2, image_size=32, threads=1)
    rows = [backward_mode_worker(spec, mode, 4, 5, repeats=1) for mode in BACKWARD_MODES]
    by = {r["mode"]: r for r in rows}
    assert all(r["f_nograd"] == 4 and r["time"] > 0 for r in rows)  # the same forward solve in every mode
    assert by["implicit"]["f_graph"] == by["implicit + JR"]["f_graph"] == 1  # JR: no second forward graph
    assert by["implicit"]["vjp"] == by["implicit + JR"]["vjp"] == 5
    assert by["phantom"]["f_graph"] == 3 and by["jfb"]["f_graph"] == 1
    assert by["phantom"]["vjp"] == by["jfb"]["vjp"] == 0
    assert by["implicit + JR"]["stats"]["jac_loss"] > 0 and "jac_loss" not in by["implicit"]["stats"]
    table = format_backward_modes(rows, 4)
    assert "| implicit + JR |" in table and "| jfb |" in table


def test_spectral_radius_is_reported_in_evaluation_only(repo):
    net = _digits_net(repo, "MODEL.SPECTRAL_RADIUS_ITERS", 4)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        rho = net(x, return_info=True)[1].spectral_radius
    assert math.isfinite(rho) and rho > 0
    net.train()
    with torch.no_grad():
        assert net(x, return_info=True)[1].spectral_radius is None  # training steps do not pay for it
