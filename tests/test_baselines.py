"""The baselines of docs/baselines.md: the explicit ResNet and the unrolled weight-tied MDEQ, built by
MODEL.NAME, trained and evaluated by the same tools as the MDEQ."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from conftest import run_process
from mdeq.config import ConfigError, load_config
from mdeq.models import count_parameters, forward_kind, get_cls_net, get_seg_net
from mdeq.models.flops import forward_flops
from mdeq.utils.checkpoint import load_checkpoint

FMNIST = "experiments/fashion_mnist/cls_mdeq_fmnist.yaml"
FMNIST_RESNET = "experiments/fashion_mnist/cls_resnet_fmnist.yaml"
FMNIST_UNROLLED = "experiments/fashion_mnist/cls_mdeq_fmnist_unrolled.yaml"
DIGITS_RESNET = "experiments/digits/cls_resnet_digits.yaml"
DIGITS_UNROLLED = "experiments/digits/cls_mdeq_digits_unrolled.yaml"


# ------------------------------------------------------------------------------------------ building
def test_fashion_baselines_have_about_the_mdeqs_parameter_count(repo):
    mdeq = get_cls_net(load_config(repo / FMNIST))
    resnet = get_cls_net(load_config(repo / FMNIST_RESNET))
    unrolled = get_cls_net(load_config(repo / FMNIST_UNROLLED))
    assert count_parameters(mdeq) == 194_434
    assert count_parameters(unrolled) == count_parameters(mdeq)          # the same stem, f and head
    assert 0.9 * 194_434 <= count_parameters(resnet) <= 1.1 * 194_434     # ResNet-20 at widths 14/28/56
    assert [forward_kind(m) for m in (mdeq, unrolled, resnet)] == ["equilibrium", "unrolled", "explicit"]
    assert {k for k, _ in mdeq.named_parameters()} == {k for k, _ in unrolled.named_parameters()}


def test_the_baseline_configs_keep_the_mdeqs_data_and_training_settings(repo):
    base = load_config(repo / FMNIST)
    for path in (FMNIST_RESNET, FMNIST_UNROLLED):
        cfg = load_config(repo / path)
        assert cfg.DATASET == base.DATASET, path
        for key in ("BATCH_SIZE_PER_GPU", "END_EPOCH", "OPTIMIZER", "LR", "WD", "LR_SCHEDULER"):
            assert cfg.TRAIN[key] == base.TRAIN[key], (path, key)
    assert load_config(repo / FMNIST_UNROLLED).MODEL.NUM_LAYERS == base.MODEL.F_THRES


def test_the_unrolled_baseline_is_the_mdeqs_unrolled_stack_in_training_and_evaluation(repo):
    torch.manual_seed(0)
    unrolled = get_cls_net(load_config(repo / DIGITS_UNROLLED))
    mdeq = get_cls_net(load_config(repo / "experiments/digits/cls_mdeq_digits.yaml"))
    mdeq.load_state_dict(unrolled.state_dict())
    calls = []
    unrolled.fullstage.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(4, 3, 32, 32)
    for train, step in ((True, 10 ** 6), (False, None)):     # long past any warm-up; evaluation
        unrolled.train(train), mdeq.train(train)
        calls.clear()
        with torch.set_grad_enabled(train):
            out, info = unrolled(x, train_step=step, return_info=True)
            want = mdeq(x, mode="unrolled", depth=6)
        assert len(calls) == 6 and info.mode == "unrolled" and info.f_rel is None
        torch.testing.assert_close(out, want)


def test_the_resnet_is_explicit_and_reports_no_solver_figures(repo):
    model = get_cls_net(load_config(repo / FMNIST_RESNET)).eval()
    x = torch.randn(2, 1, 28, 28)
    logits, info = model(x, train_step=5, return_info=True)
    assert logits.shape == (2, 10) and info.mode == "explicit"
    assert info.scalars() == {} and not info.diverged
    with pytest.raises(ValueError, match="jac_loss"):
        model(x, jac_loss=True)


def test_forward_flops_count_what_torch_flop_counter_counts(repo):
    from torch.utils.flop_counter import FlopCounterMode
    model = get_cls_net(load_config(repo / FMNIST_RESNET)).eval()
    ours = forward_flops(model, 1, [28, 28])
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, 28, 28))
    assert ours == counter.get_total_flops() > 0


# ------------------------------------------------------------------------------------------ errors
def test_unknown_model_name_is_a_clear_error(repo):
    with pytest.raises(ConfigError, match=r"MODEL.NAME = 'resnt'.*'mdeq', 'mdeq_unrolled', 'resnet'"):
        load_config(repo / FMNIST, ["MODEL.NAME", "resnt"])
    cfg = load_config(repo / FMNIST_RESNET)
    with pytest.raises(ConfigError, match=r"MODEL.NAME = 'resnet' is not a segmentation model; choose one of"):
        get_seg_net(cfg)
    cfg.defrost()
    cfg.MODEL.NAME = "vgg"
    with pytest.raises(ConfigError, match=r"MODEL.NAME = 'vgg' is not a classification model; choose one of"):
        get_cls_net(cfg)


@pytest.mark.parametrize("path, key, value", [
    (FMNIST_RESNET, "MODEL.JAC_LOSS_WEIGHT", "0.5"), (FMNIST_RESNET, "MODEL.SOFTPLUS_WARMUP", "True"),
    (FMNIST_RESNET, "MODEL.COMPILE", "True"), (FMNIST_UNROLLED, "MODEL.SPECTRAL_RADIUS_ITERS", "5")])
def test_equilibrium_settings_a_baseline_cannot_honour_are_refused(repo, path, key, value):
    with pytest.raises(ConfigError, match=f"{key} = .* does not apply to MODEL.NAME"):
        get_cls_net(load_config(repo / path, [key, value]))


def test_resnet_depth_and_widths_are_checked_at_load(repo):
    with pytest.raises(ConfigError, match=r"MODEL.RESNET.DEPTH = 21 must be 6n \+ 2"):
        load_config(repo / FMNIST_RESNET, ["MODEL.RESNET.DEPTH", "21"])
    with pytest.raises(ConfigError, match=r"MODEL.RESNET.WIDTHS = \[8, 16\] must have 3 entries"):
        load_config(repo / FMNIST_RESNET, ["MODEL.RESNET.WIDTHS", "[8, 16]"])


# ------------------------------------------------------------------------------------------ the tools
def _opts(tmp_path) -> list:
    return ["OUTPUT_DIR", str(tmp_path / "output"), "LOG_DIR", str(tmp_path / "log"), "PERCENT", "0.3",
            "TRAIN.END_EPOCH", "2", "TRAIN.BATCH_SIZE_PER_GPU", "32"]


@pytest.mark.slow
@pytest.mark.parametrize("cfg, kind, says", [
    (DIGITS_RESNET, "explicit", "explicit network (no equilibrium, no solver)"),
    (DIGITS_UNROLLED, "unrolled", "unrolled weight-tied stack of depth 6 (no equilibrium, no residual)")],
    ids=["resnet", "mdeq_unrolled"])
def test_baseline_trains_and_evaluates_through_the_tools(tmp_path, cfg, kind, says):
    stem = cfg.split("/")[-1][:-5]
    run_process([sys.executable, "tools/cls_train.py", "--cfg", cfg, *_opts(tmp_path)])
    out = tmp_path / "output" / "digits" / stem
    res = json.loads((out / "results.json").read_text())
    assert res["model"] == stem.replace("cls_", "").replace("_digits", "") and res["forward"] == kind
    assert res["global_step"] == 2 * 15 and 0.0 <= res["top1"] <= 100.0
    assert "f_rel" not in res and "f_abs" not in res                 # no residual where nothing was solved
    assert ("unrolled_depth" in res) == (kind == "unrolled") and ("forward_flops" in res) == (kind == "explicit")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["mode"] for h in history] == [kind, kind]
    assert all("f_rel" not in h["train"] and "f_rel" not in h["held_out"] for h in history)
    assert load_checkpoint(out / "checkpoint.pth.tar")["epoch"] == 2

    proc = run_process([sys.executable, "tools/cls_valid.py", "--cfg", cfg, "--testModel",
                        str(out / "final_state.pth"), *_opts(tmp_path)])
    assert says in proc.stdout
    vres = json.loads((out / "valid_results.json").read_text())
    assert vres["top1"] == pytest.approx(res["top1"]) and vres["forward"] == kind and "f_rel" not in vres

    proc = run_process([sys.executable, "tools/cls_valid.py", "--cfg", cfg, "--testModel",
                        str(out / "final_state.pth"), "--f-thres-sweep", "2,4", *_opts(tmp_path)], expect=2)
    assert "--f-thres-sweep varies the forward solver's budget: MODEL.NAME" in proc.all


@pytest.mark.slow
def test_model_cost_tool_measures_each_kind_of_model(repo, tmp_path):
    """One row per config, in order; the counts the table is built from (not the timings, which a
    benchmark prints and a test cannot judge)."""
    from mdeq.models.flops import f_flops
    out = tmp_path / "new folder" / "cost.json"      # made by the tool
    proc = run_process([sys.executable, "tools/model_cost.py", "--repeats", "1", "--infer-batch", "20", "--json", out,
                        "--cfg", DIGITS_RESNET, DIGITS_UNROLLED])
    resnet, unrolled = json.loads(out.read_text())
    assert "| cls_resnet_digits.yaml | resnet | float32 | 19,954 | n/a | n/a |" in proc.stdout
    assert resnet["forward"] == "explicit" and resnet["f_flops"] is None and resnet["f_evals"] is None
    assert resnet["forward_flops"] == forward_flops(get_cls_net(load_config(repo / DIGITS_RESNET)), 3, [32, 32])
    model = get_cls_net(load_config(repo / DIGITS_UNROLLED))
    assert unrolled["f_evals"] == 6 and unrolled["f_flops"] == f_flops(model, [32, 32])
    assert unrolled["forward_flops"] == forward_flops(model, 3, [32, 32]) > 6 * unrolled["f_flops"]  # + stem, head
    for row in (resnet, unrolled):
        assert row["batch"] == 64 and row["threads"] == 1 and row["infer_batch"] == 20 and row["dtype"] == "float32"
        assert row["train_channels_last"] is False
        assert row["train_step_s"] > 0 and row["images_per_s"] > 0 and row["process_peak_mib"] > row["step_peak_mib"] >= 0


@pytest.mark.parametrize("native", [False, True])
def test_model_cost_runs_the_step_under_train_amp_where_the_cpu_has_bfloat16(repo, monkeypatch, native):
    """TRAIN.AMP: the measured step and inference run in bfloat16 on a CPU with bfloat16 hardware
    (here pretended either way), in float32 without; the row says which."""
    import mdeq.analysis.benchmark.model_cost as cost
    import mdeq.utils.precision as precision
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    seen = []
    real = torch.nn.Conv2d._conv_forward
    monkeypatch.setattr(torch.nn.Conv2d, "_conv_forward",
                        lambda self, x, w, b: seen.append(torch.get_autocast_dtype("cpu")
                                                          if torch.is_autocast_enabled("cpu") else None) or real(self, x, w, b))
    threads = torch.get_num_threads()
    try:
        row = cost.model_cost_worker(cost.CostSpec(str(repo / DIGITS_RESNET), ["TRAIN.AMP", True, "TRAIN.BATCH_SIZE_PER_GPU", 8],
                                                   threads=1, infer_batch=4, repeats=1))
    finally:
        torch.set_num_threads(threads)
    assert row["dtype"] == ("bfloat16" if native else "float32")
    # the uncast calls are the parameter and f-evaluation counts, which run outside autocast
    assert seen and set(seen) <= {None, torch.bfloat16} and (torch.bfloat16 in seen) == native
