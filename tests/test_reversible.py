"""The reversible equilibrium (RevDEQ): the ``reversible`` solver and ``grad='reversible'``.

Its gradient must be that of the N coupled steps the forward ran, recorded in full by autograd
(:func:`mdeq.modules.coupled_steps`), on any f: a small dense map and the tiny MDEQ, in float64;
its saved tensors and graph must not grow with N; bad settings are clear errors.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import ConfigError, get_default_config, load_config
from mdeq.models import get_cls_net
from mdeq.modules import EquilibriumLayer, coupled_steps, weights_fixed
from mdeq.solvers import get_solver, reversible, solver_names

from test_equilibrium_layer import Problem

DIGITS_REV = "experiments/digits/cls_mdeq_digits_reversible.yaml"
FMNIST_REV = "experiments/fashion_mnist/cls_mdeq_fmnist_reversible.yaml"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _layer(steps: int, beta: float, **kw) -> EquilibriumLayer:
    return EquilibriumLayer("reversible", grad="reversible", f_thres=steps, f_eps=kw.pop("f_eps", 0.0), beta=beta, **kw)


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.2])
@pytest.mark.parametrize("steps", [1, 3, 12])
def test_the_gradient_is_that_of_the_stored_coupled_steps(beta, steps):
    p = Problem(scale=0.9)
    z0 = (0.1 * torch.randn(3, 6, dtype=torch.float64)).requires_grad_()
    z, info = _layer(steps, beta)(p.f, z0)
    ours = torch.autograd.grad((p.c * z).sum(), p.leaves + [z0])
    ref_z = coupled_steps(p.f, z0, steps, beta)
    ref = torch.autograd.grad((p.c * ref_z).sum(), p.leaves + [z0])
    assert torch.equal(z, ref_z)                     # the same arithmetic, step by step
    for name, a, b in zip(["W", "U", "x"], ours, ref):
        assert _rel(a, b) <= 1e-8, (name, _rel(a, b))
    # z0 acts through the first steps alone, where the rebuilt states have drifted most (by up to
    # ~|1 - beta|^-1 per step): its (tiny, the map contracts) gradient meets 1e-8 over a few steps
    assert _rel(ours[3], ref[3]) <= (1e-8 if steps <= 3 else 1e-6)
    assert info.f_steps == steps and info.f_evals == 2 * steps + 1 and info.b_steps == steps
    assert 0 <= info.b_rev_error < 1e-5          # the rebuilt start drifts more than the gradient
    with torch.no_grad():
        fz = p.f(z)
        assert info.f_rel == pytest.approx(float((fz - z).norm() / fz.norm()), rel=1e-5)


def test_the_tolerance_stops_early_and_the_gradient_is_that_of_the_steps_run():
    p = Problem(scale=0.6)
    z, info = _layer(50, 0.8, f_eps=1e-6)(p.f, p.z0())
    assert 1 < info.f_steps < 50 and info.f_rel < 1e-6 and info.f_evals == 2 * info.f_steps + 1
    ours = torch.autograd.grad((p.c * z).sum(), p.leaves)
    ref = torch.autograd.grad((p.c * coupled_steps(p.f, p.z0(), info.f_steps, 0.8)).sum(), p.leaves)
    assert all(_rel(a, b) <= 1e-8 for a, b in zip(ours, ref))
    assert info.b_steps == info.f_steps
    z, info = _layer(4, 0.8)(p.f, p.z0(), jac_loss=True)      # Jacobian regularisation: the term at z_N
    assert info.jac_loss is not None and info.jac_loss.requires_grad
    assert torch.autograd.grad(info.jac_loss, p.W)[0].abs().sum() > 0


def _tiny_mdeq(*opts):
    stage = "MODEL.EXTRA.FULL_STAGE."
    cfg = load_config(DIGITS_REV, [stage + "NUM_CHANNELS", [8, 16], "MODEL.NUM_GROUPS", 2, stage + "HEAD_CHANNELS",
                                   [4, 8], stage + "FINAL_CHANSIZE", 32, "TRAIN.PRETRAIN_STEPS", 0, *opts])
    torch.manual_seed(0)
    return get_cls_net(cfg), torch.randn(4, 3, 16, 16), torch.arange(4)


def test_the_tiny_mdeq_gradient_of_parameters_and_input_is_that_of_the_stored_steps():
    model, x, y = _tiny_mdeq("MODEL.F_THRES", 3, "MODEL.REV_BETA", 0.7)
    model.double().train()
    x = x.double()
    params = [p for p in model.parameters() if p.requires_grad]
    xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    logits, info = model(xr, return_info=True)
    ours = torch.autograd.grad(F.cross_entropy(logits, y), params + [xr], allow_unused=True)
    with weights_fixed(model.fullstage):
        problem = model.equilibrium_problem(model.injection(xs))
        z = coupled_steps(problem.f, problem.z0, 3, 0.7)
    ref = torch.autograd.grad(F.cross_entropy(model.head(problem.unflatten(z)), y), params + [xs], allow_unused=True)
    flat = lambda gs: torch.cat([(torch.zeros_like(t) if g is None else g).flatten()  # noqa: E731
                                 for g, t in zip(gs, params + [x])])
    assert info.f_steps == 3 and info.b_steps == 3
    assert flat(ref).norm() > 0 and _rel(flat(ours), flat(ref)) <= 1e-8
    # the weight-normed convolutions' g and v get theirs through the weights fixed for the call
    v = model.fullstage.branches[0].blocks[0].conv1.weight_v
    assert ours[[i for i, p in enumerate(params) if p is v][0]].abs().sum() > 0


def _saved_and_nodes(fn):
    """(the number and bytes of the tensors autograd saves for the backward while ``fn()`` runs, the
    nodes of the graph of its output)."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    nodes, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        todo.extend(n for n, _ in node.next_functions)
    return len(saved), sum(saved), len(nodes)


def test_what_the_backward_keeps_does_not_grow_with_the_steps():
    p = Problem()
    rev = {n: _saved_and_nodes(lambda: _layer(n, 0.8)(p.f, p.z0())[0]) for n in (2, 8, 32)}
    stored = {n: _saved_and_nodes(lambda: coupled_steps(p.f, p.z0(), n, 0.8)) for n in (2, 8, 32)}
    assert rev[2] == rev[8] == rev[32]
    assert rev[32][0] <= 3 and rev[32][2] <= 6          # y_N, z_N, z0; the function and W, U, x
    assert stored[2][1] < stored[8][1] < stored[32][1] and stored[32][1] > 10 * rev[32][1]


def test_bad_settings_are_clear_errors():
    for beta in (1.0, 0.0, 2.0, -0.5):
        with pytest.raises(ValueError, match="beta"):
            _layer(4, beta)
        with pytest.raises(ValueError, match="beta"):
            reversible(lambda z: z, torch.zeros(1, 2), 3, rev_beta=beta)
    with pytest.raises(ValueError, match="needs the 'reversible' forward solver"):
        EquilibriumLayer("broyden", grad="reversible")
    p = Problem()
    with pytest.raises(ValueError, match="needs the 'reversible' forward solver"):
        _layer(4, 0.8)(p.f, p.z0(), solver="anderson")
    with pytest.raises(ValueError, match="beta"):
        EquilibriumLayer("reversible", grad="implicit", beta=1.0)


def test_an_f_that_reads_other_tensors_in_the_backward_is_an_error():
    p = Problem()
    weights = {"W": p.W}
    z, _ = _layer(3, 0.8)(lambda z: torch.tanh(z @ weights["W"].T + p.x @ p.U.T), p.z0())
    weights["W"] = p.W * 1.0        # recomputed after the call: a tensor the forward did not read
    with pytest.raises(RuntimeError, match="did not read in the forward"):
        z.sum().backward()


def test_a_large_reconstruction_error_warns(caplog):
    g = torch.Generator().manual_seed(1)
    w = 3.0 * torch.randn(6, 6, generator=g)
    f = lambda z: torch.tanh(z @ w.T + 1.0)  # noqa: E731  an expansive map: rounding grows when run backwards
    layer = _layer(24, 0.8)
    x = torch.zeros(2, 6, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="mdeq.modules.reversible"):
        z, info = layer(f, x)
        z.sum().backward()
    assert info.b_rev_error > 1e-3 and "the rebuilt start lies" in caplog.text
    assert layer.drift_warning.count == 1


def test_the_config_keys_build_the_reversible_layer(repo):
    assert "reversible" in solver_names() and get_solver("reversible") is reversible
    cfg = load_config(repo / DIGITS_REV)
    assert (cfg.MODEL.F_SOLVER, cfg.MODEL.GRAD) == ("reversible", "reversible")
    layer = EquilibriumLayer.from_config(cfg)
    assert layer.grad == "reversible" and layer.solver_kwargs("f")["rev_beta"] == cfg.MODEL.REV_BETA
    # each solver gets its own relaxation, also when a call picks another solver
    assert layer.solver_kwargs("f", get_solver("anderson"))["beta"] == cfg.MODEL.ANDERSON_BETA
    assert EquilibriumLayer(grad="implicit").solver_kwargs("f", reversible)["rev_beta"] == 0.8
    with torch.device("meta"):
        assert get_cls_net(load_config(repo / FMNIST_REV)).deq.grad == "reversible"
    with pytest.raises(ConfigError, match="MODEL.GRAD = 'reversible' needs MODEL.F_SOLVER"):
        load_config(repo / DIGITS_REV, ["MODEL.F_SOLVER", "broyden"])
    with pytest.raises(ConfigError, match="MODEL.REV_BETA = 1.0"):
        load_config(repo / DIGITS_REV, ["MODEL.REV_BETA", 1.0])
    with pytest.raises(ConfigError, match="MODEL.REV_BETA"):
        load_config(repo / DIGITS_REV, ["MODEL.REV_BETA", 2.5])
    assert get_default_config().MODEL.REV_BETA == 0.8


def test_a_tiny_mdeq_trains_with_it_after_the_unrolled_warm_up():
    model, x, y = _tiny_mdeq("MODEL.F_THRES", 4, "TRAIN.PRETRAIN_STEPS", 2)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses, modes = [], []
    for step in range(10):
        opt.zero_grad()
        logits, info = model(x, train_step=step, return_info=True)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        modes.append(info.mode)
    assert modes[:2] == ["unrolled"] * 2 and modes[2:] == ["equilibrium"] * 8
    assert info.b_steps == 4 and info.f_evals == 9 and 0 <= info.b_rev_error < 1e-3
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert losses[-1] < 0.5 * losses[2]
    model.eval()
    with torch.no_grad():
        _, info = model(x, return_info=True)
    assert info.f_steps == 4 and info.b_steps is None       # evaluation: the same steps, no backward


def test_float64_states_cut_the_drift_of_a_float32_f():
    g = torch.Generator().manual_seed(1)
    w = 3.0 * torch.randn(6, 6, generator=g)
    x = torch.randn(2, 6, generator=g).requires_grad_()
    f = lambda z: torch.tanh(z @ w.T + x)  # noqa: E731  float32, expansive: rounding grows when run backwards
    errors, drift = {}, {}
    for f64 in (False, True):
        z, info = _layer(10, 0.8, float64_states=f64)(f, torch.zeros(2, 6))
        assert z.dtype == torch.float32
        ours = torch.autograd.grad(z.square().sum(), x)[0]
        ref = torch.autograd.grad(coupled_steps(f, torch.zeros(2, 6), 10, 0.8, float64_states=f64).square().sum(), x)[0]
        errors[f64], drift[f64] = _rel(ours, ref), info.b_rev_error
    assert drift[True] < 1e-3 * drift[False] and errors[True] <= 1e-6 and errors[True] < errors[False]
    cfg = load_config(DIGITS_REV, ["MODEL.REV_FLOAT64_STATES", True])
    assert EquilibriumLayer.from_config(cfg).solver_settings["f"]["float64_states"] is True


def test_the_fashion_mnist_comparison_has_reversible_variants_that_load(repo):
    from mdeq.analysis.cost_comparison import BENCHMARKS
    make_variants, baseline = BENCHMARKS["fashion_mnist_reversible"]
    variants = make_variants(repo)
    assert variants[0].name == baseline and sum("reversible" in v.name for v in variants) == 3
    for v in variants:
        cfg = load_config(v.cfg, list(v.opts))
        assert cfg.TRAIN.END_EPOCH == 5 and (cfg.MODEL.GRAD == "reversible") == ("reversible" in v.name)

