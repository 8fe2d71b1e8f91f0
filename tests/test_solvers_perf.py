"""Solver quality at an equal budget of f evaluations, Anderson on a toy problem, convergence plots.

No timing is asserted here: speed is what tools/benchmark.py reports.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mdeq.config import load_config
from mdeq.datasets.common import DatasetError
from mdeq.models import get_cls_net
from mdeq.solvers import anderson, broyden, fixed_point
from mdeq.utils.checkpoint import load_weights
from mdeq.analysis.convergence import convergence_traces


@pytest.fixture(scope="module")
def tiny_problem(reference, repo):
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_TINY.yaml", ["MODEL.DROPOUT", 0.0])
    model = get_cls_net(cfg)
    load_weights(model, reference / "cifar_tiny.pkl")
    model.eval()
    x = torch.load(reference / "cifar_tiny.expected.pt", weights_only=True)["input"]
    with torch.no_grad():
        problem = model.equilibrium_problem(model.injection(x))
    return model, problem


def test_lbroyden_beats_plain_iteration_at_30_evaluations_on_the_reference_model(tiny_problem):
    model, problem = tiny_problem
    with torch.no_grad():
        b = broyden(problem.f, problem.z0, 30, **model.solver_kwargs("f", broyden, eps=0.0))
        p = fixed_point(problem.f, problem.z0, 30, **model.solver_kwargs("f", fixed_point, eps=0.0))
    assert b.steps == p.steps == 30
    assert b.rel_residual < p.rel_residual, (b.rel_residual, p.rel_residual)


def test_anderson_on_the_reference_model_is_between_nothing_and_broyden(tiny_problem):
    model, problem = tiny_problem
    with torch.no_grad():
        a = anderson(problem.f, problem.z0, 30, **model.solver_kwargs("f", anderson, eps=0.0, memory=5))
    assert a.steps == 30 and torch.isfinite(a.z).all()
    assert a.rel_residual < a.trace[0] * 1e-1


def _toy(bsz=4, dim=50, scale=0.9, seed=3):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(bsz, dim, dim, generator=gen) * scale / dim ** 0.5
    b = torch.randn(bsz, dim, generator=gen)
    return (lambda z: torch.tanh(torch.bmm(a, z.unsqueeze(-1)).squeeze(-1)) + b), torch.zeros(bsz, dim)


@pytest.mark.parametrize("memory,beta", [(5, 1.0), (5, 0.8), (10, 1.0)])
def test_anderson_converges_on_a_contractive_problem(memory, beta):
    f, z0 = _toy()
    res = anderson(f, z0, 100, eps=1e-6, memory=memory, beta=beta)
    assert res.converged and res.steps < 100 and res.rel_residual < 1e-6
    assert torch.allclose(f(res.z), res.z, atol=1e-5)


def test_anderson_freezes_converged_samples_per_sample():
    f, z0 = _toy(bsz=3)
    easy = lambda z: torch.cat([0.01 * z[:1] + 1.0, f(z)[1:]])   # noqa: E731  sample 0 converges at once
    calls = []

    def counted(z):
        calls.append(z[0].clone())
        return easy(z)

    res = anderson(counted, z0, 60, eps=1e-6, memory=5)
    assert res.converged
    frozen_from = 3                                       # sample 0 met eps by its 3rd evaluation
    assert all(torch.equal(calls[frozen_from], c) for c in calls[frozen_from:])


def test_anderson_matches_a_dense_reference_step():
    """The 4th point Anderson evaluates mixes the 3 before it as the bordered least-squares system says."""
    f, z0 = _toy(bsz=2, dim=20)
    seen = []

    def spy(z):
        seen.append(z.clone())
        return f(z)

    lam = 1e-4
    anderson(spy, z0, 4, eps=0.0, memory=5, beta=1.0, lam=lam)
    xs = seen[:3]
    fs = [f(x) for x in xs]
    for b in range(2):
        g = torch.stack([fs[i][b] - xs[i][b] for i in range(3)])
        h = torch.zeros(4, 4)
        h[0, 1:] = h[1:, 0] = 1
        h[1:, 1:] = g @ g.T + lam * torch.eye(3)
        alpha = torch.linalg.solve(h, torch.tensor([1.0, 0, 0, 0]))[1:]
        expected = alpha @ torch.stack([fs[i][b] for i in range(3)])
        assert torch.allclose(seen[3][b], expected, atol=1e-4)


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_anderson_takes_the_plain_step_where_its_system_is_singular(beta):
    """f(z) = z + d: every residual is d, so G G^T has rank one and, unregularised, the bordered system is
    singular from the 2nd step on; each sample then takes the n = 1 step f(x) - (1 - beta) g = x + beta d."""
    d = torch.tensor([[1.0, 2.0, -1.0], [0.5, 0.0, 3.0]])
    seen = []

    def f(z):
        seen.append(z.clone())
        return z + d

    res = anderson(f, torch.zeros(2, 3), 5, eps=0.0, memory=4, beta=beta, lam=0.0)
    assert len(seen) == 5 and torch.isfinite(res.z).all()
    for k, z in enumerate(seen):
        assert torch.allclose(z, k * beta * d), (k, z)


def test_solvers_selectable_by_config_forward_and_backward(repo):
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_SMALL_paper.yaml",
                      ["MODEL.F_SOLVER", "anderson", "MODEL.B_SOLVER", "anderson", "MODEL.SOLVER_MEMORY", 4,
                       "MODEL.ANDERSON_BETA", 0.9, "MODEL.DROPOUT", 0.0])
    model = get_cls_net(cfg).train()
    assert model.f_solver is anderson and model.b_solver is anderson
    assert model.solver_kwargs("f")["memory"] == 4 and model.solver_kwargs("f")["beta"] == 0.9
    x = torch.randn(2, 3, 8, 8)
    logits, info = model(x, f_thres=5, b_thres=5, return_info=True)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    assert info.f_steps <= 5 and info.b_steps <= 5
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_stream_traces_split_the_residual_by_resolution(repo):
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_SMALL_paper.yaml", ["MODEL.DROPOUT", 0.0])
    model = get_cls_net(cfg)
    traces = convergence_traces(model, torch.randn(2, 3, 8, 8), ["broyden", "fixed_point"], 6)
    for t in traces.values():
        assert len(t["total"]) == 6 and all(len(s) == 3 for s in t["streams"])
        assert [s[0] for s in t["shapes"]] == [8, 16, 32]
        # the overall residual lies between the smallest and largest stream residuals
        for total, streams in zip(t["total"], t["streams"]):
            assert min(streams) - 1e-6 <= total <= max(streams) + 1e-6


@pytest.mark.slow
def test_plot_convergence_writes_valid_pngs(repo, tmp_path):
    from PIL import Image
    out = tmp_path / "conv"
    subprocess.run([sys.executable, "tools/plot_convergence.py", "--cfg", "experiments/cifar/cls_mdeq_SMALL_paper.yaml",
                    "--batch-size", "2", "--image-size", "16", "--evals", "8",
                    "MODEL.DROPOUT", "0.0", "--out-dir", str(out)],  # an option after an override is still one
                   cwd=repo, check=True, capture_output=True, text=True, timeout=120)
    for name in ("convergence_solvers.png", "convergence_streams.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.size[0] >= 400 and img.size[1] >= 300
    assert (out / "convergence.json").is_file()


def test_a_reused_workspace_gives_the_same_solutions_and_never_hands_back_the_start(tiny_problem):
    from mdeq.solvers import SolverWorkspace
    model, problem = tiny_problem
    ws = SolverWorkspace()
    with torch.no_grad():
        for solver in (broyden, anderson):
            own = {k: v for k, v in model.solver_kwargs("f", solver).items() if k not in ("workspace", "eps")}
            fresh = {t: solver(problem.f, problem.z0, t, eps=0.0, **own) for t in (12, 6)}
            for t in (12, 6, 12):     # a smaller solve reuses the larger buffer, and back
                again = solver(problem.f, problem.z0, t, eps=0.0, workspace=ws, **own)
                assert torch.equal(again.z, fresh[t].z) and again.trace == fresh[t].trace
        held = list(ws._free.values())
        assert len(held) == 1       # both solvers' rows are (B, D): one buffer serves them in turn
        anderson(problem.f, problem.z0, 12, eps=0.0, workspace=ws, **own)
        assert ws._free[next(iter(ws._free))].data_ptr() == held[0].data_ptr()
    # a solve that cannot improve on its start returns a copy of it, not the caller's tensor
    z0 = torch.zeros(2, 5)
    res = broyden(lambda z: z * float("nan"), z0, 5, workspace=ws)
    assert res.z.data_ptr() != z0.data_ptr() and torch.equal(res.z, z0)


def test_a_model_with_a_workspace_can_be_copied(repo):
    import copy
    import pickle
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_SMALL_paper.yaml", ["MODEL.DROPOUT", 0.0])
    model = get_cls_net(cfg).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, f_thres=6)
        assert torch.allclose(copy.deepcopy(model)(x, f_thres=6), out)
        assert torch.allclose(pickle.loads(pickle.dumps(model))(x, f_thres=6), out)


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
@pytest.mark.parametrize("threshold,memory", [(4, 12), (10, 10), (22, 60), (15, 5), (9, 0)])
def test_history_reads_are_two_rows_per_live_pair_or_iterate_at_every_step(solver, threshold, memory, monkeypatch):
    # the steps each solver really takes, counted from inside: 2 rows per live pair (L-Broyden: S^T g
    # and U c) or per mixed iterate (Anderson: the Gram row and the mixture); a plain step reads none
    from mdeq.analysis.benchmark import TimedSolver
    from mdeq.solvers import history_reads
    # the modules (the package's names anderson and broyden are the functions)
    anderson_module, broyden_module = sys.modules["mdeq.solvers.anderson"], sys.modules["mdeq.solvers.broyden"]
    seen = []
    if solver == "broyden":
        step = broyden_module._CompactBroyden.step

        def counted(self):
            seen.append(2 * min(self.pushed + 1, self.memory))
            return step(self)
        monkeypatch.setattr(broyden_module._CompactBroyden, "step", counted)
    else:
        mix = anderson_module._mix

        def counted(fs, gs, gram, border, rhs, slot, n, fx, beta):
            seen.append(2 * n if n > 1 else 0)
            return mix(fs, gs, gram, border, rhs, slot, n, fx, beta)
        monkeypatch.setattr(anderson_module, "_mix", counted)
    gen = torch.Generator().manual_seed(0)
    a = 0.5 * torch.randn(6, 6, generator=gen) / 6 ** 0.5
    z0 = torch.randn(3, 6, generator=gen)
    timed = TimedSolver(broyden if solver == "broyden" else anderson, "cpu")
    res = timed(lambda z: torch.tanh(z @ a + 1.0), z0, threshold, eps=0.0, memory=memory)
    # L-Broyden takes a step after evaluations 2 .. T - 1, Anderson mixes after 1 .. T - 1
    assert res.steps == threshold and len(seen) == threshold - (2 if solver == "broyden" else 1)
    assert history_reads(solver, threshold, memory) == sum(seen) > 0
    assert timed.history_bytes == sum(seen) * 3 * 6 * 4        # rows of (B, D) float32
    assert history_reads("fixed_point", threshold, memory) == 0


@pytest.mark.slow
def test_benchmark_tool_prints_every_table_and_the_history_that_explains_memory(repo, tmp_path):
    import json
    from mdeq.solvers import history_reads
    from mdeq.solvers.broyden import history_rows
    out = subprocess.run([sys.executable, "tools/benchmark.py", "--cfg", "experiments/cifar/cls_mdeq_SMALL_paper.yaml",
                          "--batch-size", "2", "--image-size", "16", "--repeats", "1", "--threads", "1",
                          "--f-thres", "6", "--b-thres", "6", "--mem-thres", "4,16", "MODEL.DROPOUT", "0.0",
                          "--json", str(tmp_path / "r.json"),  # an option after an override is still one
                          "MODEL.F_EPS", "0.0", "MODEL.B_EPS", "0.0"],
                         cwd=repo, check=True, capture_output=True, text=True, timeout=300)
    report = out.stdout
    for row in ("| one f evaluation", "| broyden |", "| anderson |", "| fixed_point |", "| unrolled warm-up, depth 6",
                "| implicit | 4 |", "| implicit | 16 |", "| unrolled | 16 |"):
        assert row in report, row
    r = json.loads((tmp_path / "r.json").read_text())
    dim = 8 * 16 * 16 + 16 * 8 * 8 + 32 * 4 * 4
    row, rate = 2 * dim * 4, r["read_rate"]          # bytes of a (B, D) float32 row; bytes/s
    assert rate > 0 and "| history floor / f |" in report and "Memory read rate" in report
    for name, fw in r["forward"].items():      # the history a solve of 6 evaluations must read (m = 12)
        assert fw["history_bytes"] == history_reads(name, 6, 12) * row
        assert fw["history_floor"] == pytest.approx(fw["history_bytes"] / rate)
    assert r["forward"]["broyden"]["history_floor"] > 0 and r["forward"]["fixed_point"]["history_floor"] == 0
    for name, st in r["train"].items():
        assert st["stats"]["f_steps"] == 6 and st["stats"]["b_steps"] == 6
        assert st["t_f_step"] > 0 and st["t_b_step"] > 0
        assert abs(st["overhead"] - (st["time"] / (14 * st["t_f_step"]) - 1)) < 1e-9
        limit = 6 * st["t_f_step"] + 6 * st["t_b_step"] + r["components"]["f_graph_bwd"] + r["components"]["stem_head"]
        assert abs(st["floor"] - (limit / (14 * st["t_f_step"]) - 1)) < 1e-9
        assert st["history_floor"] == pytest.approx(2 * history_reads(name, 6, 12) * row / rate / limit)
    hist = {(m["mode"], m["thres"]): m["history_mib"] for m in r["memory"]}
    # L-Broyden history (m = 12 in this config): 2 min(m + 1, T) + 1 rows of B x D floats
    for thres, rows in ((4, 9), (16, 27)):
        assert history_rows(thres, 12) == rows
        assert hist[("implicit", thres)] == pytest.approx(rows * 2 * dim * 4 / 2 ** 20)
    assert hist[("unrolled", 16)] == 0.0


def test_tool_inputs_are_real_photographs_or_a_recorded_batch(tmp_path):
    from mdeq.analysis.sample_images import normalization, photo_batch, recorded_batch
    mean, std = normalization("cifar10")
    x = photo_batch(6, 32, mean, std, seed=1)
    assert x.shape == (6, 3, 32, 32) and torch.equal(x, photo_batch(6, 32, mean, std, seed=1))
    pixels = x * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4 and pixels.std() > 0.05   # images, not noise
    assert not torch.equal(x[0], x[2])                                                     # different crops
    torch.save({"input": x[:4]}, tmp_path / "rec.pt")
    assert torch.equal(recorded_batch(tmp_path / "rec.pt", 6), x[[0, 1, 2, 3, 0, 1]])
    torch.save(torch.zeros(3, 5), tmp_path / "bad.pt")
    with pytest.raises(DatasetError, match="bad.pt: expected a \\(N, 3, H, W\\)"):  # bad input: exit status 2
        recorded_batch(tmp_path / "bad.pt", 2)


def test_benchmark_runs_only_the_parts_asked_for_and_a_wrapped_solver_gets_its_options(repo):
    from mdeq.analysis.benchmark import BenchSpec, TimedSolver, format_report, run_benchmark
    spec = BenchSpec(cfg=str(repo / "experiments/cifar/cls_mdeq_SMALL_paper.yaml"), opts=["MODEL.DROPOUT", 0.0],
                     batch_size=2, image_size=16)
    r = run_benchmark(spec, 3, 3, ["broyden"], 1, parts=["unrolled"])
    assert "components" in r and "unrolled" in r and not {"forward", "train", "memory"} & set(r)
    assert r["unrolled"]["stats"] == {"mode": "unrolled", "f_steps": 3} and r["compile"] is False
    report = format_report(r)
    assert "| unrolled warm-up, depth 3" in report and "Forward solve" not in report and "Peak memory" not in report
    with pytest.raises(ValueError, match="unknown benchmark part"):
        run_benchmark(spec, 3, 3, ["broyden"], 1, parts=["trian"])
    # the model hands a timing wrapper the options of the solver it wraps, and only those
    model = get_cls_net(load_config(spec.cfg, spec.opts))
    assert model.solver_kwargs("f", TimedSolver(anderson, "cpu")).keys() == {"eps", "stop_mode", "memory", "beta", "lam", "workspace"}
