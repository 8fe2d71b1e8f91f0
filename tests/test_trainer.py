"""The training engine shared by the tasks (mdeq.core.trainer): the bad-step policy, the health
check, the checkpoint files. End-to-end runs of the tools are in test_cls_pipeline.py,
test_seg_pipeline.py and test_reliability.py."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeq.config import load_config
from mdeq.core.checkpoint_manager import BEST, CheckpointManager
from mdeq.tasks.classification import ClassificationTask
from mdeq.core.health import HealthMonitor
from mdeq.tasks.segmentation import SegmentationTask
from mdeq.core.state import ResumableSampler, TrainState
from mdeq.core.regularization import JacobianRegularizer
from mdeq.core.step_guard import StepGuard, TrainingDiverged
from mdeq.core.trainer import Run, amp_setup, train_one_epoch, train_step
from mdeq.models import get_cls_net
from mdeq.modules import EquilibriumInfo
from mdeq.utils.checkpoint import load_checkpoint, save_checkpoint
from mdeq.utils.distributed import DistInfo
from mdeq.utils.provenance import cpu_bf16_features, cpu_model, git_commit

REPO = Path(__file__).resolve().parents[1]
DIGITS_CFG = str(REPO / "experiments/digits/cls_mdeq_digits.yaml")
SEG_CFG = str(REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml")


def _run(task, cfg, model, loader, criterion) -> Run:
    return Run(cfg=cfg, info=DistInfo(), task=task, model=model,
               optimizer=torch.optim.SGD(model.parameters(), lr=0.05), scheduler=None, scaler=None,
               criterion=criterion, loader=loader, val_loader=None)


class NaNEvery(nn.Module):
    """Cross-entropy whose value is NaN on every ``period``-th call (1: always)."""

    def __init__(self, period: int, ignore_index: int = -100) -> None:
        super().__init__()
        self.period, self.ignore_index, self.calls = period, ignore_index, 0

    def forward(self, output, target):
        self.calls += 1
        loss = F.cross_entropy(output, target, ignore_index=self.ignore_index)
        return loss * float("nan") if self.calls % self.period == 0 else loss


def test_classification_bad_steps_are_skipped_and_counted_then_stop():
    """Real MDEQ: a NaN loss skips the update (weights unchanged) but counts as a step (global step
    and schedule advance); TRAIN.MAX_BAD_STEPS in a row stop the run; a finite loss trains."""
    cfg = load_config(DIGITS_CFG, ["TRAIN.MAX_BAD_STEPS", 3, "TRAIN.PRETRAIN_STEPS", 0, "MODEL.F_THRES", 4,
                                   "MODEL.B_THRES", 4])
    model = get_cls_net(cfg)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    run = _run(ClassificationTask(), cfg, model, [(x, y)] * 5, NaNEvery(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with a non-finite loss"):
        train_one_epoch(run, 0)
    assert run.state.skipped_steps == 3 and run.state.global_step == 2  # raised during the third step
    for k, v in model.state_dict().items():
        if v.is_floating_point() and "running" not in k:
            assert torch.equal(v, before[k]), k
    # a finite loss trains, uses the equilibrium solver and its backward, and resets the count
    run.state.bad_steps = 0
    run.criterion, run.loader = nn.CrossEntropyLoss(), [(x, y)] * 2
    res = train_one_epoch(run, 0)
    assert run.state.bad_steps == 0 and run.state.global_step == 4 and math.isfinite(res["loss"])
    assert res["b_steps"] > 0 and res["steps"] == 2 and 0 <= res["top1"] <= 100
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if "weight" in k)


def test_the_step_takes_the_mode_and_the_jacobian_term_from_the_call_and_keeps_no_graph():
    """The engine passes the global step; the model's layer decides the warm-up (PRETRAIN_STEPS 1: the
    first step unrolled, the second at the equilibrium); the Jacobian term enters the loss, and the
    step's result keeps its value but not the graph of f."""
    cfg = load_config(DIGITS_CFG, ["TRAIN.PRETRAIN_STEPS", 1, "MODEL.F_THRES", 4, "MODEL.B_THRES", 4,
                                   "MODEL.JAC_LOSS_WEIGHT", 0.5])
    model = get_cls_net(cfg)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    run = _run(ClassificationTask(), cfg, model, [(x, y)], nn.CrossEntropyLoss())
    run.regularizer = JacobianRegularizer.from_cfg(cfg)
    guard = StepGuard(run.state, 3)
    first, second = (train_step(run, x, y, 0, guard) for _ in range(2))
    modes = (first.equilibrium.mode, second.equilibrium.mode, run.last_mode)
    assert modes == ("unrolled", "equilibrium", "equilibrium")
    for r in (first, second):
        assert not r.skipped and r.equilibrium.scalars()["jac_loss"] > 0
        assert not r.equilibrium.jac_loss.requires_grad
    assert second.equilibrium.b_steps > 0 and second.equilibrium.b_fallback is not None   # filled by the backward


class TinySeg(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 19, 1)

    def forward(self, x, return_info=False, **_):
        out = self.conv(x)
        return (out, EquilibriumInfo(mode="unrolled", f_steps=3)) if return_info else out


def test_segmentation_bad_steps_follow_the_same_policy():
    """(image, label, name) batches; every second loss NaN: 3 updates, 3 skipped, 6 steps counted."""
    cfg = load_config(SEG_CFG, ["TRAIN.MAX_BAD_STEPS", "3", "PRINT_FREQ", "1"])
    batches = [(torch.randn(2, 3, 8, 8), torch.randint(0, 19, (2, 8, 8)), ["a", "b"]) for _ in range(6)]
    model = TinySeg()
    w0 = model.conv.weight.detach().clone()
    run = _run(SegmentationTask(), cfg, model, batches, NaNEvery(2, ignore_index=255))
    res = train_one_epoch(run, 0)
    assert res["steps"] == 3 and run.state.skipped_steps == 3 and run.state.global_step == 6
    assert run.state.batch_in_epoch == 6
    assert torch.isfinite(model.conv.weight).all() and not torch.equal(model.conv.weight, w0)
    run.criterion, run.state = NaNEvery(1, ignore_index=255), TrainState()
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        train_one_epoch(run, 1)
    assert run.criterion.calls == 3


# ------------------------------------------------------------------------------------------ health
def _eq(f_rel: float, fallback: bool) -> EquilibriumInfo:
    return EquilibriumInfo(mode="equilibrium", f_rel=f_rel, b_fallback=fallback)


def test_health_check_names_fallbacks_residual_and_loss_rise():
    h = HealthMonitor()
    for _ in range(10):
        h.observe(_eq(0.01, False))
        h.observe(EquilibriumInfo(mode="unrolled", f_steps=6))   # warm-up steps are not judged
    assert h.end_epoch(0.5, torch.device("cpu")) == ([], "backward fallbacks 0% of 10 equilibrium steps, final "
                                                       "forward relative residual 0.01")
    for i in range(10):
        h.observe(_eq(0.5 if i >= 5 else 0.01, i % 4 != 0))   # 70 % fallbacks; the last quarter far off
    problems, _ = h.end_epoch(0.6, torch.device("cpu"))
    assert len(problems) == 2
    assert "fell back to the one-step gradient on 70% of 10 equilibrium steps" in problems[0]
    assert "mean relative residual of 0.5" in problems[1]
    # the loss: judged against the lowest epoch mean, which survives a resume
    state = h.state_dict()
    h2 = HealthMonitor()
    h2.load_state_dict(state)
    assert h2.end_epoch(0.8, torch.device("cpu")) == ([], "no equilibrium steps")  # 1.6x: not far enough
    (problem,), _ = h2.end_epoch(2.3, torch.device("cpu"))
    assert "rose to 2.3, 4.6x the lowest epoch mean so far (0.5)" in problem
    assert HealthMonitor().end_epoch(float("nan"), torch.device("cpu"))[0] == []


# ------------------------------------------------------------------------------------------ checkpoints
def _manager(tmp_path, model, cfg, best_metric="top1", steps_per_epoch=0, best_mode="max") -> CheckpointManager:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = ResumableSampler(list(range(10)), seed=cfg.SEED)
    return CheckpointManager(str(tmp_path), cfg, True, best_metric, model, opt, None, None, sampler, TrainState(),
                             stateful={"health": HealthMonitor()}, steps_per_epoch=steps_per_epoch,
                             best_mode=best_mode)


def test_model_best_is_never_replaced_by_a_worse_model(tmp_path):
    cfg = load_config(DIGITS_CFG)
    model = nn.Linear(2, 2)
    m = _manager(tmp_path, model, cfg)
    assert m.update_best(50.0, 0)
    saved = load_checkpoint(tmp_path / BEST)
    assert saved["best_metric"] == "top1" and saved["top1"] == 50.0 and saved["epoch"] == 1
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not m.update_best(40.0, 1) and not m.update_best(float("nan"), 2)
    assert torch.equal(load_checkpoint(tmp_path / BEST)["model"]["weight"], saved["model"]["weight"])
    assert m.update_best(60.0, 3) and load_checkpoint(tmp_path / BEST)["top1"] == 60.0


def test_a_resume_never_lowers_the_best_below_model_best(tmp_path, caplog):
    """An epoch copy may predate the run's model_best: the resumed best is the higher of the two, so a
    worse evaluation after the resume does not replace model_best; an unreadable model_best is
    named and the checkpoint's best is kept."""
    cfg = load_config(DIGITS_CFG)
    model = nn.Linear(2, 2)
    m = _manager(tmp_path, model, cfg)
    assert m.save_latest(2, 0, epoch_end=True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    ckpt.update(best=50.0, _path="an epoch copy")
    assert m.update_best(80.0, 4)
    best_file = (tmp_path / BEST).read_bytes()
    m2 = _manager(tmp_path, nn.Linear(2, 2), cfg)
    m2.restore(ckpt, cfg.SEED, 0)
    assert m2.best == 80.0
    assert not m2.update_best(60.0, 2)
    assert (tmp_path / BEST).read_bytes() == best_file
    (tmp_path / BEST).write_bytes(best_file[:100])
    m3 = _manager(tmp_path, nn.Linear(2, 2), cfg)
    with caplog.at_level("WARNING"):
        m3.restore(ckpt, cfg.SEED, 0)
    assert m3.best == 50.0 and f"cannot read the score of {tmp_path / BEST}" in caplog.text


def test_a_minimised_metric_keeps_the_lowest_in_model_best_and_across_a_resume(tmp_path, caplog):
    """best_mode "min" (an error): a lower score is the new best, a higher one or NaN is not; a
    resume from a checkpoint whose best (0.5) predates model_best (0.2) keeps 0.2; an unknown mode
    is refused by name."""
    cfg = load_config(DIGITS_CFG)
    m = _manager(tmp_path, nn.Linear(2, 2), cfg, best_metric="error", best_mode="min")
    assert m.best == math.inf
    assert m.update_best(0.5, 0) and not m.update_best(0.7, 1) and not m.update_best(float("nan"), 2)
    assert m.save_latest(3, 0, epoch_end=True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert ckpt["best"] == 0.5 and ckpt["best_mode"] == "min"
    assert m.update_best(0.2, 3)
    saved = load_checkpoint(tmp_path / BEST)
    assert saved["error"] == 0.2 and saved["best_mode"] == "min" and saved["epoch"] == 4
    best_file = (tmp_path / BEST).read_bytes()
    m2 = _manager(tmp_path, nn.Linear(2, 2), cfg, best_metric="error", best_mode="min")
    m2.restore({**ckpt, "_path": "an epoch copy"}, cfg.SEED, 0)
    assert m2.best == 0.2 and not m2.update_best(0.3, 4)
    assert (tmp_path / BEST).read_bytes() == best_file
    # a checkpoint kept under the other mode: its best is no score to beat
    m3 = _manager(tmp_path / "other", nn.Linear(2, 2), cfg, best_metric="error", best_mode="max")
    with caplog.at_level("WARNING"):
        m3.restore({**ckpt, "_path": "a min run"}, cfg.SEED, 0)
    assert m3.best == -math.inf and "best_mode 'min', this run's task has 'max'" in caplog.text
    with pytest.raises(ValueError, match="best_mode 'lowest'"):
        _manager(tmp_path, nn.Linear(2, 2), cfg, best_mode="lowest")


def test_a_resume_with_another_epoch_length_warns_in_one_line_and_restarts_a_cut_epoch(tmp_path, caplog):
    """Saved mid-epoch (batch 4 of 6, batch size 16) and resumed with batch size 32 (3 steps per epoch):
    one warning naming both settings, the epoch restarts from its first batch, and where the schedule
    goes; the same settings resume silently where they stopped."""
    cfg16 = load_config(DIGITS_CFG, ["TRAIN.BATCH_SIZE_PER_GPU", 16, "TRAIN.END_EPOCH", 4])
    m = _manager(tmp_path, nn.Linear(2, 2), cfg16, steps_per_epoch=6)
    m.state.global_step = 10
    assert m.save_latest(1, 4, epoch_end=False)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert ckpt["steps_per_epoch"] == 6
    with caplog.at_level("WARNING"):
        assert _manager(tmp_path, nn.Linear(2, 2), cfg16, steps_per_epoch=6).restore(ckpt, cfg16.SEED, 0) == (1, 4)
    assert "another epoch length" not in caplog.text
    cfg32 = load_config(DIGITS_CFG, ["TRAIN.BATCH_SIZE_PER_GPU", 32, "TRAIN.END_EPOCH", 4])
    with caplog.at_level("WARNING"):
        assert _manager(tmp_path, nn.Linear(2, 2), cfg32, steps_per_epoch=3).restore(ckpt, cfg32.SEED, 0) == (1, 0)
    [line] = [r.getMessage() for r in caplog.records if "another epoch length" in r.getMessage()]
    assert "TRAIN.BATCH_SIZE_PER_GPU 16 -> 32, steps per epoch 6 -> 3" in line and "processes" not in line
    assert "epoch 1 restarts from its first batch" in line
    assert "goes on from step 10 and ends at step 19 where this run's epochs plan 12" in line


class _ScriptedScores(ClassificationTask):
    """The digits task with planted held-out scores (one per epoch) and a planted health problem on
    the epochs in ``unhealthy``."""

    def __init__(self, scores, unhealthy) -> None:
        self.scores, self.unhealthy, self.epoch = list(scores), set(unhealthy), -1

    def evaluate(self, model, loader, cfg, info):
        self.epoch += 1
        return {**super().evaluate(model, loader, cfg, info), "top1": self.scores[self.epoch]}

    def health_problem(self, cfg, train, val):
        return "a planted problem" if self.epoch in self.unhealthy else None


def test_the_best_is_saved_before_each_epoch_checkpoint_and_never_from_an_unhealthy_epoch(tmp_path, caplog):
    """Scores 20, 90, 30 with epoch 1 unhealthy: model_best holds epoch 0 then epoch 2, never the 90;
    every epoch's checkpoint records the best including its own epoch."""
    from mdeq.core.trainer import fit
    cfg = load_config(DIGITS_CFG, ["PERCENT", 0.03, "TRAIN.BATCH_SIZE_PER_GPU", 16, "TRAIN.END_EPOCH", 3,
                                   "TRAIN.PRETRAIN_STEPS", 0, "MODEL.F_THRES", 8, "MODEL.B_THRES", 3,
                                   "TRAIN.KEEP_CHECKPOINTS", 3, "TEST.BATCH_SIZE_PER_GPU", 300])
    bests = []
    real_update = CheckpointManager.update_best

    def update_best(self, value, epoch):   # records model_best's score after every update
        changed = real_update(self, value, epoch)
        bests.append((epoch, load_checkpoint(tmp_path / BEST)["top1"]))
        return changed

    with caplog.at_level("WARNING"), pytest.MonkeyPatch.context() as mp:
        mp.setattr(CheckpointManager, "update_best", update_best)
        results = fit(_ScriptedScores([20.0, 90.0, 30.0], {1}), cfg, DistInfo(), str(tmp_path), str(tmp_path / "tb"))
    assert "epoch 1 looks unhealthy: a planted problem" in caplog.text
    assert bests == [(0, 20.0), (2, 30.0)]   # the unhealthy epoch 1 was not even offered
    assert results["best_top1"] == 30.0 and load_checkpoint(tmp_path / BEST)["epoch"] == 3
    assert [load_checkpoint(tmp_path / f"checkpoint_ep{e:04d}.pth.tar")["best"] for e in (1, 2, 3)] == [20.0, 20.0, 30.0]


class _ScriptedErrors(_ScriptedScores):
    """Planted held-out errors, minimised."""

    best_metric, best_mode = "error", "min"

    def evaluate(self, model, loader, cfg, info):
        result = super().evaluate(model, loader, cfg, info)
        return {**result, "error": result["top1"]}


def test_fit_keeps_the_lowest_error_in_model_best_across_epochs_and_a_resume(tmp_path):
    """Errors 30, 10, 20: model_best holds epoch 1's 10 and results.json reports it; resumed from the
    copy of epoch 0 (whose best, 30, predates model_best) with errors 20, 15, model_best stays."""
    from mdeq.core.trainer import fit
    opts = ["PERCENT", 0.03, "TRAIN.BATCH_SIZE_PER_GPU", 16, "TRAIN.END_EPOCH", 3, "TRAIN.PRETRAIN_STEPS", 0,
            "MODEL.F_THRES", 8, "MODEL.B_THRES", 3, "TRAIN.KEEP_CHECKPOINTS", 3, "TEST.BATCH_SIZE_PER_GPU", 300]
    results = fit(_ScriptedErrors([30.0, 10.0, 20.0], ()), load_config(DIGITS_CFG, opts), DistInfo(), str(tmp_path),
                  str(tmp_path / "tb"))
    best = load_checkpoint(tmp_path / BEST)
    assert results["best_error"] == 10.0 and best["error"] == 10.0 and best["epoch"] == 2
    written = json.loads((tmp_path / "results.json").read_text())   # the code and the machine it ran on
    assert written["commit"] == git_commit() and written["cpu_bf16"] == cpu_bf16_features()
    assert written["threads"] == torch.get_num_threads() and written["cpu_model"] == cpu_model()
    assert load_checkpoint(tmp_path / "checkpoint_ep0001.pth.tar")["best"] == 30.0
    best_file = (tmp_path / BEST).read_bytes()
    cfg = load_config(DIGITS_CFG, opts + ["TRAIN.RESUME", True,
                                          "TRAIN.CHECKPOINT", str(tmp_path / "checkpoint_ep0001.pth.tar")])
    results = fit(_ScriptedErrors([20.0, 15.0], ()), cfg, DistInfo(), str(tmp_path), str(tmp_path / "tb"))
    assert results["best_error"] == 10.0 and results["error"] == 15.0
    assert (tmp_path / BEST).read_bytes() == best_file


def test_checkpoints_of_the_previous_format_still_resume(tmp_path):
    """Format 2 named the best metric per task (best_acc / best_miou) and had no health state."""
    cfg = load_config(DIGITS_CFG)
    model = nn.Linear(2, 2)
    m = _manager(tmp_path, model, cfg)
    assert m.save_latest(3, 0, epoch_end=True)
    ckpt = load_checkpoint(tmp_path / "checkpoint.pth.tar")
    assert ckpt["best_metric"] == "top1" and "health" in ckpt
    old = {k: v for k, v in ckpt.items() if k not in ("best", "best_metric", "health")}
    old.update(format_version=2, best_acc=87.5, global_step=30)
    save_checkpoint(old, tmp_path / "old.pth.tar")
    m2 = _manager(tmp_path, nn.Linear(2, 2), cfg)
    old["_path"] = str(tmp_path / "old.pth.tar")
    assert m2.restore(old, cfg.SEED, 0) == (3, 0)
    assert m2.best == 87.5 and m2.state.global_step == 30
    assert torch.equal(m2.model.weight, model.weight)


def test_amp_is_bfloat16_without_a_scaler_where_the_device_has_it_else_float16_with_one(monkeypatch, caplog):
    """TRAIN.AMP picks the autocast dtype the device supports; only float16 gets a loss scaler; a CPU
    without bfloat16 in hardware trains in float32 with a warning (the step itself: tests/test_device.py)."""
    import mdeq.utils.precision as precision
    assert amp_setup(False, torch.device("cuda")) == (None, None)
    assert amp_setup(False, torch.device("cpu")) == (None, None)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING"):
        assert amp_setup(True, torch.device("cpu")) == (None, None)
    assert "TRAIN.AMP is set but cpu has no fast half-precision type" in caplog.text
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert amp_setup(True, torch.device("cpu")) == (torch.bfloat16, None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_setup(True, torch.device("cuda")) == (torch.bfloat16, None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    with warnings.catch_warnings():  # without CUDA the scaler warns that it disables itself
        warnings.simplefilter("ignore")
        dtype, scaler = amp_setup(True, torch.device("cuda"))
    assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)


class _RecordsAutocast(nn.Module):
    """A stand-in model: a 1x1 convolution to ``classes`` maps (pooled for classification) that
    records whether it ran under autocast, with the solver statistics the evaluations read."""

    def __init__(self, classes: int, pooled: bool) -> None:
        super().__init__()
        self.conv, self.pooled, self.autocast = nn.Conv2d(3, classes, 1), pooled, []

    def forward(self, x, return_info=False):
        self.autocast.append(torch.is_autocast_enabled(x.device.type))
        out = self.conv(x)
        out = out.mean(dim=(2, 3)) if self.pooled else out
        return (out, EquilibriumInfo(mode="equilibrium", f_steps=4, f_rel=0.01)) if return_info else out


@pytest.mark.parametrize("amp", [False, True])
def test_held_out_evaluation_autocasts_under_train_amp_in_both_tasks(monkeypatch, amp):
    """Both tasks evaluate in the training's autocast dtype under TRAIN.AMP (bfloat16 here, on the
    CPU, by pretending that the CPU is a device autocast_dtype chooses one for)."""
    import mdeq.tasks.classification as cls_mod
    import mdeq.tasks.segmentation as seg_mod
    for mod in (cls_mod, seg_mod):
        monkeypatch.setattr(mod, "autocast_dtype", lambda enabled, device: torch.bfloat16 if enabled else None)
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    images = torch.randn(4, 3, 8, 8)
    cls_model = _RecordsAutocast(10, pooled=True)
    cfg = load_config(DIGITS_CFG, ["TRAIN.AMP", amp])
    res = cls_mod.validate(cls_model, [(images, torch.tensor([0, 1, 2, 3]))], cfg, cpu, is_main=False)
    assert cls_model.autocast == [amp] and res["num_samples"] == 4 and math.isfinite(res["loss"])
    seg_model = _RecordsAutocast(3, pooled=False)
    labels = torch.randint(0, 3, (4, 8, 8))
    scores = seg_mod.evaluate(seg_model, [(images, labels, ["a", "b", "c", "d"])], 3, cpu, is_main=False, amp=amp)
    assert seg_model.autocast == [amp] and scores["images"] == 4 and 0.0 <= scores["miou"] <= 1.0


def test_starting_weights_are_read_only_when_asked_for(tmp_path):
    """A resumed run builds its model without TRAIN.MODEL_FILE (the checkpoint replaces every weight):
    the file is not even read then."""
    cfg = load_config(DIGITS_CFG, ["TRAIN.MODEL_FILE", str(tmp_path / "gone.pth")])
    ClassificationTask().build_model(cfg, initial_weights=False)
    with pytest.raises(FileNotFoundError):
        ClassificationTask().build_model(cfg, initial_weights=True)


def test_the_model_files_to_evaluate_default_to_the_final_weights_and_must_exist(tmp_path):
    from mdeq.core.checkpoint_manager import FINAL, model_files
    cfg = load_config(DIGITS_CFG)
    with pytest.raises(FileNotFoundError, match=f"no model to evaluate: {tmp_path / FINAL} does not exist"):
        model_files(cfg, str(tmp_path))
    (tmp_path / FINAL).write_bytes(b"x")
    a, b = tmp_path / "a.pth", tmp_path / "b.pth"
    a.write_bytes(b"x"), b.write_bytes(b"x")
    assert model_files(cfg, str(tmp_path)) == [str(tmp_path / FINAL)]
    cfg = load_config(DIGITS_CFG, ["TEST.MODEL_FILE", f"{a},{b}"])
    assert model_files(cfg, str(tmp_path), several=True) == [str(a), str(b)]
    with pytest.raises(FileNotFoundError, match="does not exist"):   # one file, so the list is one name
        model_files(cfg, str(tmp_path))



def test_only_the_main_process_warns_of_an_unhealthy_epoch_and_names_the_kept_copy(tmp_path, caplog):
    """Every rank judges an epoch alike (the figures are reduced); a rank other than 0 writes no copy,
    so it says nothing (it once named a checkpoint_healthy.pth.tar that was never written)."""
    from types import SimpleNamespace
    from mdeq.core.trainer import _judge_health
    cfg = load_config(DIGITS_CFG)
    health = SimpleNamespace(equilibrium_steps=1, end_epoch=lambda loss, device: (["a planted problem"], "n"))
    for rank, latest in ((1, True), (0, False), (0, True)):
        out = tmp_path / f"{rank}{latest}"
        out.mkdir()
        manager = _manager(out, nn.Linear(2, 2), cfg)
        manager.is_main = rank == 0
        if latest:      # an earlier epoch's checkpoint, as rank 0 wrote it
            (out / "checkpoint.pth.tar").write_bytes(b"an earlier state")
        run = SimpleNamespace(cfg=cfg, info=DistInfo(rank=rank, world_size=2), health=health,
                              task=SimpleNamespace(health_problem=lambda *a: None))
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert _judge_health(run, manager, 4, {"loss": 1.0}, {}) is False
        if rank == 1:
            assert caplog.text == ""
        else:
            kept = str(tmp_path / "0True" / "checkpoint_healthy.pth.tar") if latest else "(no earlier checkpoint)"
            assert "epoch 4 looks unhealthy: a planted problem (n)" in caplog.text and f"kept as {kept}." in caplog.text
        assert (out / "checkpoint_healthy.pth.tar").exists() == (rank == 0 and latest)
