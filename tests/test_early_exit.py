"""Per-sample exit from the forward solve (evaluation): samples that meet the stopping rule leave the
batch the solver works on, each sample's result is the whole-batch solve's, the evaluations of f
per image are reported, the setting is chosen by the sweep, and bad settings are named."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from mdeq.analysis.sweep import ExitSweepRow, choose_setting, format_exit_table, parse_exit_settings
from mdeq.config import ConfigError, load_config
from mdeq.core.metrics import count_histogram, histogram_stats
from mdeq.models import get_cls_net
from mdeq.modules import EquilibriumLayer
from mdeq.modules.early_exit import ExitSetting, PredictionRule
from mdeq.solvers import SampleExit, anderson, broyden, fixed_point
from mdeq.tasks.classification import validate

DIGITS_CFG = "experiments/digits/cls_mdeq_digits.yaml"
SOLVERS = {"broyden": broyden, "anderson": anderson, "fixed_point": fixed_point}


class MixedBatch:
    """z = tanh(c_b W z + x_b): sample b contracts by about c_b, so small c_b converge in a few steps
    and large ones take many. ``f_of(rows)`` is f of those samples alone; ``calls`` records the batch
    size of every evaluation."""

    def __init__(self, batch: int = 10, dim: int = 24) -> None:
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5
        self.x = torch.randn(batch, dim, generator=g, dtype=torch.float64)
        self.c = torch.linspace(0.1, 1.3, batch, dtype=torch.float64)[:, None]   # easy ... hard
        self.calls: list = []

    def f_of(self, rows: torch.Tensor):
        x, c = self.x[rows], self.c[rows]

        def f(z: torch.Tensor) -> torch.Tensor:
            self.calls.append(z.shape[0])
            return torch.tanh(c * (z @ self.w.T) + x)
        return f

    def solve(self, solver, exit_: SampleExit = None, threshold: int = 25, eps: float = 1e-6):
        self.calls = []
        rows = torch.arange(self.x.shape[0])
        kw = {} if exit_ is None else {"sample_exit": exit_}
        return SOLVERS[solver](self.f_of(rows), torch.zeros_like(self.x), threshold, eps=eps, **kw)


def _class_held_rule(patience: int, batch: int) -> PredictionRule:
    """A stateful rule: the 'class' argmax of the first 3 coordinates held for ``patience`` evaluations."""
    return PredictionRule(lambda fz: fz[:, :3], patience, batch, torch.device("cpu"))


@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_leaving_samples_get_the_whole_batch_result_at_fewer_evaluations(solver):
    p = MixedBatch()
    whole = p.solve(solver)
    whole_calls = sum(p.calls)
    left = p.solve(solver, SampleExit(restrict=p.f_of))
    left_calls = sum(p.calls)
    torch.testing.assert_close(left.z, whole.z, rtol=0, atol=1e-12)
    torch.testing.assert_close(left.fz, whole.fz, rtol=0, atol=1e-12)
    assert left.rel_residual == pytest.approx(whole.rel_residual, rel=1e-9)
    # the easy samples left early: f saw fewer rows, and the per-sample counts say how many
    assert whole.sample_evals.tolist() == [whole.steps] * 10
    assert left_calls == int(left.sample_evals.sum()) < whole_calls == 10 * whole.steps
    assert left.sample_evals[0] < left.sample_evals[-1] and sorted(p.calls, reverse=True) == p.calls


def _every_third_row_at_once(fz: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A rule that stops rows 0, 3, 6, 9 at the first evaluation (at z0: they must not move)."""
    return rows % 3 == 0


@pytest.mark.parametrize("solver", sorted(SOLVERS))
@pytest.mark.parametrize("make, least", [(lambda: _class_held_rule(3, 10), 3), (lambda: _every_third_row_at_once, 1)],
                         ids=["class-held-3-times", "every-third-row-at-once"])
def test_a_rule_gives_the_same_results_whether_samples_leave_or_stay_frozen(solver, make, least):
    p = MixedBatch()
    frozen = p.solve(solver, SampleExit(rule=make()))
    left = p.solve(solver, SampleExit(restrict=p.f_of, rule=make()))
    torch.testing.assert_close(left.z, frozen.z, rtol=0, atol=1e-12)
    torch.testing.assert_close(left.fz, frozen.fz, rtol=0, atol=1e-12)
    assert left.sample_evals.min() == least and sum(p.calls) == int(left.sample_evals.sum())
    # the rule stopped samples before the residual did
    assert sum(p.calls) < 10 * p.solve(solver).steps


def test_the_layer_takes_an_exit_in_evaluation_only_and_with_a_solver_that_has_one():
    p = MixedBatch()
    z0, exit_ = torch.zeros_like(p.x), SampleExit(restrict=p.f_of)
    layer = EquilibriumLayer("broyden", f_thres=25, f_eps=1e-6)
    with torch.no_grad():
        z, info = layer(p.f_of(torch.arange(10)), z0, sample_exit=exit_)
    assert info.f_sample_evals.sum() < 10 * info.f_steps and info.evaluations_per_sample(10) is info.f_sample_evals
    assert "f_sample_evals" in info.stats() and isinstance(info.stats()["f_sample_evals"], float)
    with pytest.raises(ValueError, match="evaluation only"):
        layer(p.f_of(torch.arange(10)), z0.requires_grad_(), sample_exit=exit_)
    with torch.no_grad(), pytest.raises(ValueError, match="sample_exit.*not taken by 'reversible'"):
        reversible = EquilibriumLayer("reversible", f_thres=5, rev_beta=0.8)
        reversible(p.f_of(torch.arange(10)), z0.detach(), sample_exit=exit_)


def _digits_net(*opts):
    """The digits model (random weights), fed 8 x 8 images below to keep f cheap."""
    torch.manual_seed(0)
    return get_cls_net(load_config(DIGITS_CFG, list(opts))).eval()


def test_the_models_restricted_f_is_f_of_those_samples():
    net = _digits_net()
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        problem = net.equilibrium_problem(net.injection(x))
        z = torch.randn_like(problem.z0)
        rows = torch.tensor([4, 1, 5])
        torch.testing.assert_close(problem.restrict(rows)(z[rows]), problem.f(z)[rows], rtol=1e-5, atol=1e-6)


RELEASED = ("experiments/fashion_mnist/cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1.yaml",
            "pretrained_models/cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1.pth")


@pytest.fixture(scope="module")
def released_net():
    """The released Fashion-MNIST model and 32 of its test images (float32)."""
    from mdeq.datasets import build_cls_val_dataset
    from mdeq.datasets.fashion_mnist import DEFAULT_ROOT
    from mdeq.utils.checkpoint import load_weights
    if not os.path.isfile(os.path.join(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST is not installed in {DEFAULT_ROOT}")
    cfg = load_config(RELEASED[0], ["DATASET.TEST_SET", "test"])
    net = get_cls_net(cfg).eval()
    load_weights(net, RELEASED[1])
    test_set = build_cls_val_dataset(cfg)
    images = torch.stack([test_set[i][0] for i in range(32)])
    return net, images


@pytest.mark.parametrize("rule, solver", [("residual:0.01@10", "broyden"), ("prediction:2@10", "broyden"),
                                          ("margin:0.9@10", "broyden"), ("residual:0.01@10", "anderson"),
                                          ("prediction:3@10", "fixed_point")])
def test_the_model_gives_each_sample_the_whole_batch_result(released_net, rule, solver):
    net, x = released_net
    setting = ExitSetting.parse(rule)
    with torch.no_grad():
        net.set_exit(setting)
        left, info = net(x, return_info=True, solver=solver)
        net.set_exit(dataclasses.replace(setting, leave=False))
        frozen, info_frozen = net(x, return_info=True, solver=solver)
    net.set_exit(ExitSetting())
    torch.testing.assert_close(left, frozen, rtol=1e-4, atol=1e-4)
    assert torch.equal(left.argmax(1), frozen.argmax(1))
    assert info_frozen.f_sample_evals.tolist() == [info_frozen.f_steps] * 32
    # samples left at different evaluations, the batch's last one at the whole batch's
    evals = info.f_sample_evals
    assert evals.min() < evals.max() == info_frozen.f_steps and int(evals.sum()) < 32 * info_frozen.f_steps


def test_validate_reports_evaluations_per_image_and_images_per_second():
    net = _digits_net()
    cfg = load_config(DIGITS_CFG)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(24, 3, 8, 8, generator=g) * torch.logspace(-2, 1.5, 24)[:, None, None, None]
    loader = DataLoader(TensorDataset(images, torch.randint(0, 10, (24,), generator=g)), batch_size=12)
    net.set_exit(ExitSetting(f_thres=6))
    fixed = validate(net, loader, cfg, torch.device("cpu"))
    assert fixed["f_evals_mean"] == fixed["f_steps"] == 6 and fixed["f_evals_p90"] == 6
    assert fixed["images_per_s"] > 0
    net.set_exit(ExitSetting(rule="prediction", patience=2, f_thres=6))
    early = validate(net, loader, cfg, torch.device("cpu"))
    assert 2 <= early["f_evals_mean"] < 6 and early["f_evals_p90"] in range(2, 7)
    from mdeq.programs.classification import _solver_figures
    assert "f evaluations per image mean" in _solver_figures(early) and "images/s" in _solver_figures(early)


def test_histogram_statistics():
    hist = count_histogram(torch.tensor([2, 2, 2, 3, 3, 4, 2, 2, 9, 2]), 8)
    assert hist.tolist() == [0, 0, 6, 2, 1, 0, 0, 1]      # 9 in the last bin
    stats = histogram_stats(hist, 0.9)
    assert stats["mean"] == pytest.approx(2.9) and stats["quantile"] == 4
    assert histogram_stats(count_histogram(torch.tensor([5] * 10), 8), 0.9)["quantile"] == 5


def test_the_sweep_chooses_the_best_top1_at_the_fewest_evaluations():
    rows = [ExitSweepRow("none@4", 93.6, 4.0, 4, 1.0, 0.1), ExitSweepRow("none@10", 93.7, 10.0, 10, 1.0, 0.01),
            ExitSweepRow("prediction:2@10", 93.7, 2.6, 3, 1.0, 0.2), ExitSweepRow("none@2", 87.0, 2.0, 2, 1.0, 0.8)]
    assert choose_setting(rows).setting == "prediction:2@10"
    assert choose_setting(rows, slack=0.2).setting == "prediction:2@10"
    assert choose_setting(rows, slack=7.0).setting == "none@2"
    assert "| **prediction:2@10** | 93.70 | 2.60 | 3 |" in format_exit_table(rows, rows[2])
    base = ExitSetting(tol=0.05)
    got = parse_exit_settings("none@4, residual:0.01@10,prediction:3,margin:0.9@8", base)
    assert [s.label() for s in got] == ["none@4", "residual:0.01@10", "prediction:3@-1", "margin:0.9@8"]
    assert got[2].tol == 0.05 and got[1].config_items()["TEST.EXIT_TOL"] == 0.01


@pytest.mark.parametrize("opts, message", [
    (["TEST.EXIT_RULE", "early"], r"TEST.EXIT_RULE = 'early'; choose one of \('none', 'residual'"),
    (["TEST.EXIT_PATIENCE", "1"], r"TEST.EXIT_PATIENCE = 1 is out of range: must be >= 2"),
    (["TEST.EXIT_TOL", "0.0"], r"TEST.EXIT_TOL = 0.0 is out of range: must be > 0"),
    (["TEST.EXIT_MARGIN", "1.5"], r"TEST.EXIT_MARGIN = 1.5 is out of range: must be in \(0, 1\]"),
    (["TEST.F_THRES", "0"], r"TEST.F_THRES = 0 is out of range"),
])
def test_bad_config_values_are_named(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DIGITS_CFG, opts)


def test_settings_the_model_cannot_run_are_named():
    with pytest.raises(ConfigError, match="MODEL.F_SOLVER = 'reversible' has no per-sample exit"):
        _digits_net("TEST.EXIT_RULE", "residual", "MODEL.F_SOLVER", "reversible", "MODEL.B_SOLVER", "broyden",
                    "MODEL.REV_BETA", "0.8")
    from conftest import SEG_CFG, SEG_TINY
    from mdeq.models import get_seg_net
    with pytest.raises(ConfigError, match="'prediction' reads class logits, which the head of MDEQSegNet does not"):
        get_seg_net(load_config(SEG_CFG, SEG_TINY + ["TEST.EXIT_RULE", "prediction"]))
    with pytest.raises(ConfigError, match=r"exit setting 'prediction:x@4'.*not a number"):
        ExitSetting.parse("prediction:x@4")
    with pytest.raises(ConfigError, match="write RULE"):
        ExitSetting.parse("fixed@4")


def test_cls_valid_exit_sweep_names_the_best_setting_at_the_fewest_evaluations(tmp_path):
    """``tools/cls_valid.py --exit-sweep``'s part of the program (the process setup left out)."""
    import argparse

    from mdeq.programs.classification import PROGRAM
    from mdeq.utils.distributed import DistInfo
    parser = argparse.ArgumentParser()
    PROGRAM.add_options(parser, test=True)
    args = parser.parse_args(["--exit-sweep", "none@2,none@1,prediction:2@3"])
    cfg = load_config(DIGITS_CFG, ["WORKERS", 0, "TEST.BATCH_SIZE_PER_GPU", 150])
    out = PROGRAM.exit_sweep(_digits_net(), "random.pth", args, cfg, DistInfo(), str(tmp_path))
    rows = {r["setting"]: r for r in out["rows"]}
    assert list(rows) == ["none@2", "none@1", "prediction:2@3"] and rows["none@1"]["f_evals_mean"] == 1.0
    assert rows["prediction:2@3"]["f_evals_p90"] <= 3
    best = max(r["top1"] for r in out["rows"])
    fewest = min(r["f_evals_mean"] for r in out["rows"] if r["top1"] == best)
    assert out["chosen"]["top1"] == best and out["chosen"]["f_evals_mean"] == fewest
    assert out["config"]["TEST.F_THRES"] == int(out["chosen"]["setting"].rsplit("@", 1)[1])
    assert (tmp_path / "exit_sweep.json").is_file()
    with pytest.raises(ConfigError, match="--exit-sweep varies the forward solve"):
        PROGRAM.exit_sweep(get_cls_net(load_config(DIGITS_CFG, ["MODEL.NAME", "mdeq_unrolled"])), "x.pth", args,
                           cfg, DistInfo(), str(tmp_path))
