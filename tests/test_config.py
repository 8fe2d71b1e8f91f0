"""Experiment files and configuration errors."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mdeq.config import ConfigError, load_config
from mdeq.models import get_cls_net, get_seg_net

EXPERIMENTS = sorted((Path(__file__).resolve().parents[1] / "experiments").rglob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_loads_and_builds(path):
    cfg = load_config(path)
    assert cfg.is_frozen()
    build = get_seg_net if cfg.DATASET.DATASET == "cityscapes" else get_cls_net
    with torch.device("meta"):
        model = build(cfg)
    if cfg.MODEL.NAME == "resnet":      # the explicit baseline: three stages of (DEPTH - 2) / 6 blocks
        assert [len(s) for s in model.stages] == [(cfg.MODEL.RESNET.DEPTH - 2) // 6] * 3
    else:
        assert len(model.fullstage.branches) == cfg.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES


def test_experiment_files_cover_the_paper_and_the_original():
    names = {f"{p.parent.name}/{p.stem}" for p in EXPERIMENTS}
    for n in ("cifar/cls_mdeq_TINY", "cifar/cls_mdeq_LARGE", "imagenet/cls_mdeq_SMALL", "imagenet/cls_mdeq_LARGE",
              "imagenet/cls_mdeq_XL", "cityscapes/seg_mdeq_SMALL", "cityscapes/seg_mdeq_LARGE",
              "cityscapes/seg_mdeq_XL", "cifar/cls_mdeq_SMALL_paper", "cifar/cls_mdeq_paper",
              "imagenet/cls_mdeq_SMALL_paper", "imagenet/cls_mdeq_LARGE_paper",
              "cityscapes/seg_mdeq_SMALL_paper", "cityscapes/seg_mdeq_LARGE_paper"):
        assert n in names


def test_paper_table4_settings(repo):
    small = load_config(repo / "experiments/cifar/cls_mdeq_SMALL_paper.yaml")
    assert list(small.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS) == [8, 16, 32]
    assert (small.MODEL.F_THRES, small.MODEL.B_THRES, small.MODEL.SOLVER_MEMORY) == (15, 18, 12)
    assert small.DATASET.AUGMENT is False and small.MODEL.DROPOUT == 0.2
    large = load_config(repo / "experiments/imagenet/cls_mdeq_LARGE_paper.yaml")
    assert list(large.MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS) == [80, 160, 320, 640]
    assert (large.MODEL.F_THRES, large.MODEL.B_THRES, large.MODEL.SOLVER_MEMORY) == (22, 25, 18)
    assert large.MODEL.DOWNSAMPLE_TIMES == 2 and large.TRAIN.NESTEROV is True


def test_misspelt_key_in_a_file_names_key_value_and_file(tmp_path, repo):
    bad = tmp_path / "bad.yaml"
    bad.write_text((repo / "experiments/cifar/cls_mdeq_TINY.yaml").read_text()
                   .replace("  F_THRES: 22", "  F_TRESH: 22"))
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    msg = str(err.value)
    assert "MODEL.F_TRESH" in msg and "22" in msg and str(bad) in msg and "MODEL.F_THRES" in msg


def test_misspelt_override_and_wrong_type(repo):
    path = repo / "experiments/cifar/cls_mdeq_TINY.yaml"
    with pytest.raises(ConfigError, match=r"unknown config key MODEL\.DROPUT = 0\.1 \(did you mean MODEL\.DROPOUT\?\)"):
        load_config(path, ["MODEL.DROPUT", "0.1"])
    with pytest.raises(ConfigError, match=r"wrong type for config key TRAIN\.LR: got 'fast'"):
        load_config(path, ["TRAIN.LR", "fast"])
    with pytest.raises(ConfigError, match="MODEL.F_SOLVER"):
        load_config(path, ["MODEL.F_SOLVER", "newton"])
    with pytest.raises(ConfigError, match="MODEL.STATE_LAYOUT"):
        load_config(path, ["MODEL.STATE_LAYOUT", "nhwc"])
    with pytest.raises(ConfigError, match="NUM_CHANNELS has 3 entries"):
        load_config(path, ["MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16, 32]"])


def test_overrides_coerce_harmless_types(repo):
    cfg = load_config(repo / "experiments/cifar/cls_mdeq_TINY.yaml", ["TRAIN.LR", 1, "MODEL.F_THRES", "30"])
    assert cfg.TRAIN.LR == 1.0 and isinstance(cfg.TRAIN.LR, float) and cfg.MODEL.F_THRES == 30


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_registered_solver_is_a_valid_config_choice(repo, monkeypatch):
    """The solver registry is the one list of solver names: the config accepts what it holds."""
    from mdeq.solvers import fixed_point, get_solver, history_rows, register_solver, registry, solver_names
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))   # the registration ends with the test
    path = repo / "experiments/cifar/cls_mdeq_TINY.yaml"
    with pytest.raises(ConfigError, match=r"MODEL\.B_SOLVER = 'damped'; choose one of \('broyden', 'anderson', "
                                          r"'fixed_point', 'reversible'\)"):
        load_config(path, ["MODEL.B_SOLVER", "damped"])

    def damped(f, z0, threshold, eps=1e-3, stop_mode="rel"):
        return fixed_point(f, z0, threshold, eps=eps, stop_mode=stop_mode)

    register_solver("damped", damped, history_rows=lambda threshold, memory: 3)
    cfg = load_config(path, ["MODEL.F_SOLVER", "damped", "MODEL.B_SOLVER", "damped"])
    with torch.device("meta"):
        model = get_cls_net(cfg)
    assert model.f_solver is damped and model.b_solver is damped and get_solver("damped") is damped
    assert solver_names()[-1] == "damped" and history_rows(damped, 30, 12) == 3
    with pytest.raises(ValueError, match="already registered"):
        register_solver("damped", fixed_point)


def test_the_registry_declares_each_solvers_history(repo):
    """The benchmark's history sizes come from the solvers' registry entries (2 rows per Broyden slot + 1,
    2 per Anderson iterate, none for plain iteration; m = 12 with 40 steps: 13 slots / 12 iterates)."""
    from mdeq.solvers import history_rows
    assert (history_rows("broyden", 40, 12), history_rows("anderson", 40, 12), history_rows("fixed_point", 40, 12)) \
        == (27, 24, 0)
    assert history_rows(lambda *a: None, 40, 12) == 0   # an unregistered callable: unknown, counted as none


def test_the_model_names_the_key_of_an_unknown_solver(repo):
    """Where a config skipped the load-time check (a solver owner not imported yet), building the model
    still names the key and the choices."""
    from mdeq.config import get_default_config
    cfg = get_default_config()
    cfg.MODEL.F_SOLVER = "newton"
    with pytest.raises(ConfigError, match=r"MODEL\.F_SOLVER = 'newton'; choose one of \('broyden'"):
        get_cls_net(cfg)
