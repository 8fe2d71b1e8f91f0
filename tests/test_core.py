"""The equilibrium core on configurations other than the reference: gradients, solvers, dropout."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mdeq.config import load_config
from mdeq.models import get_cls_net, get_seg_net
from mdeq.modules import VariationalDropout2d, WeightNormConv2d
from mdeq.solvers import anderson, broyden, fixed_point

SMALL_OVERRIDES = {
    # 4 scales, 2 downsamplings (ImageNet-style), shrunk for a CPU test
    "imagenet4": ("experiments/imagenet/cls_mdeq_SMALL_paper.yaml", get_cls_net, (6, 3, 32, 32), [
        "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16, 16, 16]", "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 4, 4, 4]",
        "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16", "MODEL.NUM_CLASSES", "10", "MODEL.EXPANSION_FACTOR", "2"]),
    "segmentation": ("experiments/cityscapes/seg_mdeq_SMALL_paper.yaml", get_seg_net, (6, 3, 32, 48), [
        "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16, 16, 16]", "MODEL.EXPANSION_FACTOR", "2"]),
    "cifar_small_paper": ("experiments/cifar/cls_mdeq_SMALL_paper.yaml", get_cls_net, (6, 3, 8, 8), []),
}


def _build(repo, key, extra=(), device="cpu"):
    path, build, shape, opts = SMALL_OVERRIDES[key]
    cfg = load_config(repo / path, opts + ["MODEL.DROPOUT", "0.0", *extra])
    torch.manual_seed(0)
    return build(cfg).double().to(device), torch.randn(*shape, dtype=torch.float64).to(device)


def _loss(model, out):
    idx = torch.arange(out.shape[2] * out.shape[3] if out.dim() == 4 else out.shape[0], device=out.device)
    if out.dim() == 4:  # segmentation: per-pixel targets from a fixed pattern
        target = idx.remainder(out.shape[1]).view(1, *out.shape[2:])
        return F.cross_entropy(out, target.expand(out.shape[0], -1, -1))
    return F.cross_entropy(out, idx % out.shape[1])


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def _warm_up(model, x, steps):
    """A few Adam steps in the unrolled mode, as the paper's warm-up: a randomly initialised MDEQ
    has no attracting equilibrium (its gradient is not defined), a briefly trained one has."""
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, model(x, mode="unrolled")).backward()
        opt.step()


def _dense_implicit_gradient(model, x, f_thres):
    """The implicit-function-theorem gradient with the adjoint system solved exactly.

    At the equilibrium z* of the forward solver, J = df/dz is formed densely (D VJPs per sample),
    w = (I - J^T)^{-1} dl/dz by a direct solve, and w is pushed through f to the parameters.
    """
    problem = model.equilibrium_problem(model.injection(x))
    with torch.no_grad():
        z_star = model.f_solver(problem.f, problem.z0, f_thres, **model.solver_kwargs("f")).z
    z_leaf = z_star.clone().requires_grad_()
    fz = problem.f(z_leaf)
    z_out = fz.detach().requires_grad_()
    (dl_dz,) = torch.autograd.grad(_loss(model, model.head(problem.unflatten(z_out))), z_out)
    bsz, dim = z_star.shape
    eye = torch.eye(dim, dtype=z_star.dtype, device=z_star.device)
    w = torch.empty_like(dl_dz)
    for i in range(bsz):
        basis = torch.zeros(dim, bsz, dim, dtype=z_star.dtype, device=z_star.device)
        basis[:, i] = eye
        (rows,) = torch.autograd.grad(fz, z_leaf, basis, retain_graph=True, is_grads_batched=True)
        w[i] = torch.linalg.solve(eye - rows[:, i].T, dl_dz[i])      # rows[:, i] is J of sample i
    model.zero_grad()
    out = problem.f(z_star)
    out.register_hook(lambda _: w)
    _loss(model, model.head(problem.unflatten(out))).backward()
    return _grads(model)


@pytest.mark.parametrize("key", sorted(SMALL_OVERRIDES))
def test_implicit_gradient_equals_the_exact_ift_gradient(repo, key, device):
    model, x = _build(repo, key, ["MODEL.F_EPS", "1e-12", "MODEL.B_EPS", "1e-12"], device=device)
    model.train()
    _warm_up(model, x, 60)
    model.zero_grad()
    logits, info = model(x[:2], mode="equilibrium", f_thres=60, b_thres=60, return_info=True)
    _loss(model, logits).backward()
    ours = _grads(model)
    assert info.f_rel < 1e-4 and not info.b_fallback
    exact = _dense_implicit_gradient(model, x[:2], 60)
    cos = F.cosine_similarity(ours, exact, dim=0).item()
    rel = ((ours - exact).norm() / exact.norm()).item()
    assert cos >= 0.999 and rel <= 1e-2, (cos, rel)


def test_failed_backward_solve_falls_back_to_a_descent_direction(repo):
    model, x = _build(repo, "cifar_small_paper")
    model.train()
    logits, info = model(x, train_step=-1, f_thres=30, b_thres=1, return_info=True)
    _loss(model, logits).backward()
    assert info.b_fallback is True
    grads = _grads(model)
    assert torch.isfinite(grads).all()
    # unlike the original (exact zeros), f's weights and the stem still get a gradient
    assert model.fullstage.branches[0].blocks[0].conv1.weight_v.grad.abs().sum() > 0
    assert model.downsample[0].weight.grad.abs().sum() > 0


def test_unrolled_warmup_runs_num_layers_and_switches_at_pretrain_steps(repo):
    model, x = _build(repo, "cifar_small_paper", ["TRAIN.PRETRAIN_STEPS", "5", "MODEL.NUM_LAYERS", "3"])
    model.eval()
    with torch.no_grad():
        assert model(x, train_step=4, return_info=True)[1].stats() == {"mode": "unrolled", "f_steps": 3}
        assert model(x, train_step=5, return_info=True)[1].mode == "equilibrium"


def test_the_call_chooses_mode_depth_solver_and_tolerance_and_leaves_the_model_as_it_was(repo):
    model, x = _build(repo, "cifar_small_paper", ["TRAIN.PRETRAIN_STEPS", "5", "MODEL.NUM_LAYERS", "3"])
    model.eval()
    with torch.no_grad():
        unrolled, info = model(x, mode="unrolled", return_info=True)
        assert info.stats() == {"mode": "unrolled", "f_steps": 3}
        assert torch.equal(model(x, 0), unrolled)                      # the original's positional train_step
        assert model(x, mode="unrolled", depth=7, return_info=True)[1].stats() == {"mode": "unrolled", "f_steps": 7}
        info = model(x, mode="equilibrium", f_thres=6, solver="fixed_point", eps=0.0, return_info=True)[1]
        assert info.f_steps == 6 and len(info.f_trace) == 6
        fixed = model(x, f_thres=6, solver=(fixed_point, "broyden"), eps=0.0)
        plain = fixed_point(*_problem(model, x), 6, eps=0.0)
        assert torch.allclose(model.head(model.equilibrium_problem(model.injection(x)).unflatten(plain.fz)), fixed)
        assert model(x, return_info=True)[1].mode == "equilibrium"     # the default, whatever PRETRAIN_STEPS
    # nothing of the calls stuck to the model
    assert model.f_solver is broyden and model.deq.depth == 3 and model.solver_kwargs("f")["eps"] == 1e-5
    for bad, match in ((dict(mode="warmup"), "mode must be one of"), (dict(mode="unrolled", train_step=0), "not both"),
                       (dict(solver="newton"), "unknown solver 'newton'"), (dict(solver=("broyden",)), "a pair")):
        with pytest.raises(ValueError, match=match):
            model(x, **bad)


def _problem(model, x):
    problem = model.equilibrium_problem(model.injection(x))
    return problem.f, problem.z0


def test_solvers_reject_unknown_options_and_get_only_their_own_from_the_model(repo):
    f = lambda z: 0.5 * z + 1.0  # noqa: E731
    z0 = torch.zeros(2, 4)
    for solver, bad in ((broyden, "beta"), (anderson, "restart"), (fixed_point, "memory"), (broyden, "memroy")):
        with pytest.raises(TypeError, match=bad):
            solver(f, z0, 5, **{bad: 1})
    model, _ = _build(repo, "cifar_small_paper", ["MODEL.ANDERSON_BETA", "0.7", "MODEL.SOLVER_MEMORY", "4"])
    assert set(model.solver_kwargs("f", fixed_point)) == {"eps", "stop_mode"}
    assert model.solver_kwargs("b", anderson)["beta"] == 0.7 and "restart" not in model.solver_kwargs("b", anderson)
    assert model.solver_kwargs("f", broyden)["memory"] == 4 and "beta" not in model.solver_kwargs("f", broyden)
    with pytest.raises(ValueError, match=r"\['memroy'\] not taken by 'broyden'"):
        model.solver_kwargs("f", broyden, memroy=3)


def test_softplus_warmup_changes_f_and_switches_back(repo):
    model, x = _build(repo, "cifar_small_paper")
    model.eval()
    with torch.no_grad():
        relu_out = model(x, train_step=0)
        model.set_softplus(True)
        soft_out = model(x, train_step=0)
        model.set_softplus(False)
        again = model(x, train_step=0)
    assert not torch.allclose(relu_out, soft_out)
    assert torch.equal(relu_out, again)


def test_variational_dropout_keeps_one_mask_per_solve():
    drop = VariationalDropout2d(0.5).train()
    x = torch.ones(4, 6, 5, 5)
    drop.reset_mask(x)
    a, b = drop(x), drop(x)
    assert torch.equal(a, b)                                # the same mask at every iteration
    assert torch.equal(a[:, :, :1, :1].expand_as(a), a)       # and at every pixel
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    drop.reset_mask(x)
    masks = {tuple(drop(x)[:, :, 0, 0].flatten().tolist()) for _ in range(1)}
    assert masks  # a fresh draw is possible
    with pytest.raises(RuntimeError, match="reset_mask"):
        VariationalDropout2d(0.3).train()(x)


def test_weight_norm_parameters_and_recomputation():
    conv = WeightNormConv2d(3, 4, 3, padding=1)
    assert {n for n, _ in conv.named_parameters()} == {"weight_g", "weight_v"}
    assert conv.weight_g.shape == (4, 1, 1, 1)
    x = torch.randn(2, 3, 8, 8)
    y = conv(x)
    with torch.no_grad():
        conv.weight_g.mul_(2.0)       # a change of g shows at once in the next forward
    assert torch.allclose(conv(x), 2 * y, atol=1e-5)
    norms = conv.weight.flatten(1).norm(dim=1)
    assert torch.allclose(norms, conv.weight_g.flatten(), atol=1e-5)


def test_weights_fixed_computes_w_once_per_call_with_the_same_gradients(repo, monkeypatch):
    from mdeq.modules import weights_fixed
    model, x = _build(repo, "imagenet4", ["MODEL.GRAD", "phantom", "MODEL.PHANTOM_STEPS", "3"])
    convs = [m for m in model.modules() if isinstance(m, WeightNormConv2d)]
    computed = [0]
    weight = WeightNormConv2d.weight

    def counted(mod):
        computed[0] += 1
        return weight.fget(mod)
    monkeypatch.setattr(WeightNormConv2d, "weight", property(counted))
    grads = []
    for fixed in (True, False):
        if not fixed:  # what the model did before: w recomputed by every application of f
            for m in convs:
                monkeypatch.setattr(m, "forward", lambda inp, m=m: torch.nn.functional.conv2d(
                    inp, m.weight, m.bias, m.stride, m.padding))
        model.zero_grad(set_to_none=True)
        computed[0] = 0
        _loss(model, model(x, mode="equilibrium", f_thres=6, eps=0.0)).backward()
        # once per call; before, once more by each of the 9 applications of f (6 solver steps + 3 phantom)
        assert computed[0] == (len(convs) if fixed else 10 * len(convs))
        assert all(m.fixed_weight is None for m in convs)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    with weights_fixed(model):
        outer = [m.fixed_weight for m in convs]
        with weights_fixed(model):                        # nested: the outer block's w stays
            assert all(m.fixed_weight is w for m, w in zip(convs, outer))
        assert all(m.fixed_weight is w for m, w in zip(convs, outer))
    assert all(m.fixed_weight is None for m in convs)


def _contractive_problem(bsz=3, dim=40):
    torch.manual_seed(1)
    a = torch.randn(bsz, dim, dim) * 0.6 / dim ** 0.5
    b = torch.randn(bsz, dim)
    return lambda z: torch.tanh(torch.bmm(a, z.unsqueeze(-1)).squeeze(-1)) + b, torch.zeros(bsz, dim)


@pytest.mark.parametrize("solver", [broyden, anderson, fixed_point])
def test_solvers_converge_and_report_stats(solver):
    f, z0 = _contractive_problem()
    res = solver(f, z0, 200, eps=1e-7)
    assert res.converged and res.rel_residual < 1e-7 and res.steps < 200
    assert len(res.trace) == res.steps and res.trace[0] == pytest.approx(1.0)
    assert torch.allclose(f(res.z), res.z, atol=1e-5)


def test_broyden_beats_fixed_point_at_equal_evaluations():
    f, z0 = _contractive_problem()
    assert broyden(f, z0, 20, eps=0).rel_residual < fixed_point(f, z0, 20, eps=0).rel_residual


def test_fixed_point_iteration_on_a_repelling_map_is_stopped_and_returns_its_best_iterate():
    f = lambda z: 3.0 * z + 1.0  # noqa: E731  (fixed point -0.5, repelling for plain iteration)
    res = fixed_point(f, torch.zeros(2, 5), 60, eps=1e-8, stop_mode="abs")
    assert res.diverged and not res.converged and res.steps < 60
    assert torch.equal(res.z, torch.zeros(2, 5))          # the start had the lowest residual
    rel = fixed_point(f, torch.zeros(2, 5), 60, eps=1e-8, stop_mode="rel")
    assert rel.diverged and rel.steps < 60 and torch.isfinite(rel.z).all()
    # a root finder is not fooled by the repulsion
    assert torch.allclose(broyden(f, torch.zeros(2, 5), 60, eps=1e-8).z, torch.full((2, 5), -0.5))


@pytest.mark.parametrize("solver", [broyden, anderson, fixed_point])
def test_non_finite_values_stop_the_solver_with_a_finite_result(solver):
    calls = []

    def f(z):
        calls.append(1)
        return z * 0.5 + 1.0 if len(calls) < 3 else z * float("nan")

    res = solver(f, torch.ones(2, 5), 20, eps=1e-12)
    assert res.diverged and res.steps < 20 and torch.isfinite(res.z).all()


MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch, torch.nn.functional as F

    def peak_rss_kb():
        # VmHWM belongs to this process image; ru_maxrss would also count the forking parent's
        # peak (Linux carries it over exec), which hides everything under a large pytest process.
        try:
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from mdeq.config import load_config
    from mdeq.models import get_cls_net
    torch.set_num_threads(1)
    thres, unrolled = int(sys.argv[1]), sys.argv[2] == "unrolled"
    cfg = load_config("experiments/cifar/cls_mdeq_SMALL_paper.yaml",
                      ["MODEL.DROPOUT", 0.0, "MODEL.F_EPS", 0.0, "MODEL.B_EPS", 0.0, "MODEL.NUM_LAYERS", thres,
                       "TRAIN.PRETRAIN_STEPS", 10 if unrolled else 0])
    model = get_cls_net(cfg).train()
    x, y = torch.randn(32, 3, 32, 32), torch.arange(32) % 10
    infos = []

    def step():
        logits, info = model(x, train_step=0 if unrolled else -1, f_thres=thres, b_thres=thres, return_info=True)
        F.cross_entropy(logits, y).backward()
        infos[:] = [info]

    step()                                   # warm up allocator and kernels
    base = peak_rss_kb()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step()
    peak = peak_rss_kb()
    print(json.dumps({"peak_kb": peak, "base_kb": base, "stats": infos[0].stats()}))
""")


def _peak_kb(repo, thres, mode="implicit"):
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(thres), mode], cwd=repo, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_training_step_memory_does_not_grow_with_thresholds(repo):
    low, high = _peak_kb(repo, 10), _peak_kb(repo, 40)
    assert high["stats"]["f_steps"] == 40 and high["stats"]["b_steps"] == 40 and low["stats"]["f_steps"] == 10
    unrolled = _peak_kb(repo, 40, "unrolled")  # backprop through 40 layers: what growth looks like
    growth_unrolled = unrolled["peak_kb"] - low["peak_kb"]
    assert growth_unrolled > 100_000, ("the measurement cannot see memory growth", low, high, unrolled)
    assert high["peak_kb"] - low["peak_kb"] < 0.05 * growth_unrolled + 8_000, (low, high, unrolled)


def _dense_lbroyden_trace(f, z0, threshold, memory):
    """Limited-memory Broyden written out densely for one sample (float64): the step is
    g + U M^-1 S^T g with M = triu(S^T S) - S^T U over the last ``memory`` pairs, oldest first."""
    z, fz = z0, f(z0)
    g = fz - z
    trace, step, pairs = [(g.norm() / fz.norm()).item()], g, []
    for _ in range(threshold - 1):
        z_new = z + step
        fz_new = f(z_new)
        pairs = (pairs + [(step, fz_new - fz)])[-memory:]
        z, fz = z_new, fz_new
        g = fz - z
        trace.append((g.norm() / fz.norm()).item())
        s_mat = torch.stack([p[0] for p in pairs], 1)
        u_mat = torch.stack([p[1] for p in pairs], 1)
        m_mat = torch.triu(s_mat.T @ s_mat) - s_mat.T @ u_mat
        step = g + u_mat @ torch.linalg.solve(m_mat, s_mat.T @ g)
    return trace


@pytest.mark.parametrize("memory", [2, 3, 20])
def test_limited_memory_broyden_equals_the_dense_formula_also_after_dropping_pairs(memory):
    torch.manual_seed(3)
    dim, thres = 30, 14
    a = (torch.randn(2, dim, dim) * 0.8 / dim ** 0.5).double()
    b = torch.randn(2, dim).double()
    kw = dict(eps=0.0, memory=memory, restart=0.0, max_step=0.0)
    batch = broyden(lambda z: torch.tanh(torch.bmm(a, z.unsqueeze(-1)).squeeze(-1)) + b,
                    torch.zeros(2, dim, dtype=torch.float64), thres, **kw)
    for i in range(2):
        def f(z, i=i):            # (1, D) -> (1, D): sample i alone
            return torch.tanh(z @ a[i].T) + b[i]
        dense = _dense_lbroyden_trace(lambda z: f(z[None])[0], torch.zeros(dim, dtype=torch.float64), thres, memory)
        alone = broyden(f, torch.zeros(1, dim, dtype=torch.float64), thres, **kw)
        assert alone.steps == thres and alone.trace == pytest.approx(dense, rel=2e-6)   # norms are float32
        assert torch.allclose(batch.z[i], alone.z[0], rtol=1e-10, atol=1e-12)   # samples do not interact


@pytest.mark.parametrize("solver", [broyden, anderson, fixed_point])
def test_solvers_build_no_autograd_graph(solver):
    # the solvers run without autograd even when called with it on (as the backward solve is)
    weight = torch.full((5,), 0.5, requires_grad=True)
    grad_mode = []

    def f(z):
        grad_mode.append(torch.is_grad_enabled())
        return weight * z + 1.0

    res = solver(f, torch.zeros(2, 5), 40, eps=1e-8)
    assert not any(grad_mode) and not res.z.requires_grad and not res.fz.requires_grad
    assert torch.allclose(res.z, torch.full((2, 5), 2.0), atol=1e-4)


@pytest.mark.parametrize("key", ["imagenet4", "segmentation"])
def test_f_flops_counts_what_torch_flop_counter_counts(repo, key):
    from torch.utils.flop_counter import FlopCounterMode

    from mdeq.tasks.classification import f_flops
    model, x = _build(repo, key)
    size = [x.shape[3], x.shape[2]]
    ours = f_flops(model, size)
    with torch.no_grad():
        inj = model.injection(x[:1])
        z = [inj.new_zeros(1, *s) for s in model.state_shapes(inj)]
        counter = FlopCounterMode(display=False)
        with counter:
            model.fullstage(z, inj)
    assert ours is not None and ours == counter.get_total_flops() > 0
    assert model.training and not any(m._forward_hooks for m in model.modules())


def test_full_resolution_stem_blocks_run_before_the_strided_stem_and_train(repo):
    """MODEL.STEM_BLOCKS adds residual blocks at the input's resolution, computed once per forward:
    the injection changes, f's shapes and FLOPs do not, and every stem weight gets a gradient."""
    from mdeq.models.flops import f_flops
    from mdeq.models.resnet import BasicBlock
    path, build, shape, opts = SMALL_OVERRIDES["imagenet4"]
    plain = build(load_config(repo / path, opts + ["MODEL.DROPOUT", "0.0"]))
    cfg = load_config(repo / path, opts + ["MODEL.DROPOUT", "0.0", "MODEL.STEM_BLOCKS", "2", "MODEL.STEM_CHANNELS", "6"])
    torch.manual_seed(0)
    model = build(cfg)
    blocks = [m for m in model.full_res_stem if isinstance(m, BasicBlock)]
    assert len(blocks) == 2 and model.full_res_stem[0].out_channels == 6
    assert model.downsample[0].in_channels == 6 and plain.full_res_stem is None
    x = torch.randn(*shape)
    seen = []
    hook = model.full_res_stem.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    inj = model.injection(x)
    hook.remove()
    assert seen == [torch.Size([shape[0], 6, shape[2], shape[3]])]         # the input's resolution
    assert inj.shape == plain.injection(x).shape
    assert f_flops(model, [shape[3], shape[2]]) == f_flops(plain, [shape[3], shape[2]])
    _loss(model, model(x, mode="unrolled")).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.full_res_stem.parameters())
    extra = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in plain.parameters())
    # conv3x3 3 -> 6 and BN, two blocks of two conv3x3 6 -> 6 with BN; the strided conv takes 6 channels, not 3
    c0 = model.downsample[0].out_channels
    assert extra == 3 * 6 * 9 + 2 * 6 + 2 * (2 * 6 * 6 * 9 + 2 * 2 * 6) + (6 - 3) * c0 * 9
