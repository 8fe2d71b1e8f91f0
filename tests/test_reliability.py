"""Reliability: crashes lose nothing, resumed runs continue exactly, downloaded files run no code,
bad inputs give one clear line (exit status 2) without touching earlier output, divergence stops
cleanly (exit status 3) and leaves the last good checkpoint.

The training runs are tools/cls_train.py subprocesses on the embedded digits (6 steps per epoch,
2 epochs, a 4-step warm-up then the equilibrium solver), deterministic, one log line per step.
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from conftest import SEG_CFG, TOOL_ENV, build_cityscapes_tree, patched_tool, run_process
from mdeq.analysis.training_curves import read_history
from mdeq.utils.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CFG = str(REPO / "experiments/digits/cls_mdeq_digits.yaml")
STEPS_PER_EPOCH = 6
FOLDER = ("digits", "cls_mdeq_digits")


def _opts(out: Path, **extra: str) -> List[str]:
    opts = {"OUTPUT_DIR": str(out / "output"), "LOG_DIR": str(out / "log"), "PERCENT": "0.06",
            "TRAIN.BATCH_SIZE_PER_GPU": "16", "TRAIN.END_EPOCH": "2", "TRAIN.PRETRAIN_STEPS": "4",
            "MODEL.F_THRES": "4", "MODEL.B_THRES": "4", "DETERMINISTIC": "True", "PRINT_FREQ": "1",
            "DATASET.AUGMENT": "True", "TRAIN.OPTIMIZER": "sgd", "TRAIN.LR": "0.05", "TRAIN.KEEP_CHECKPOINTS": "2",
            "TEST.BATCH_SIZE_PER_GPU": "150"}
    opts.update(extra)
    return [s for kv in opts.items() for s in kv]


def _train_cmd(out: Path, **extra: str) -> List[str]:
    return [sys.executable, str(REPO / "tools/cls_train.py"), "--cfg", CFG, *_opts(out, **extra)]


def _run_many(cmds: List[List[str]], expect: Optional[int] = None) -> List[subprocess.CompletedProcess]:
    """Run independent commands concurrently (they mostly wait on imports)."""
    with ThreadPoolExecutor(max_workers=3) as pool:
        return list(pool.map(lambda c: run_process(c, expect=expect), cmds))


def _out_dir(base: Path) -> Path:
    return base / "output" / FOLDER[0] / FOLDER[1]


def _losses(text: str) -> Dict[int, str]:
    """global step -> the loss logged for it (as printed, 6 decimals)."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"\] step (\d+) loss (\S+)", text)}


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: its per-step losses and final checkpoints."""
    base = tmp_path_factory.mktemp("reference")
    proc = run_process(_train_cmd(base))
    losses = _losses(proc.stdout)
    assert sorted(losses) == list(range(2 * STEPS_PER_EPOCH))
    out = _out_dir(base)
    return {"losses": losses, "out": out, "final": load_checkpoint(out / "checkpoint.pth.tar"),
            "epoch1": out / "checkpoint_ep0001.pth.tar"}


def _start(cmd: List[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env or TOOL_ENV, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(cond, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before the kill point:\n{log.read_text()[-4000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"kill point not reached in {timeout}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.02)


def _resume_and_compare(base: Path, reference: dict, min_step: int) -> str:
    """Resume in ``base``; the resumed run logs the reference's loss at every step it runs, runs no
    step before ``min_step`` and ends with the reference's weights, bit for bit."""
    proc = run_process(_train_cmd(base, **{"TRAIN.RESUME": "True"}))
    got = _losses(proc.stdout)
    assert got, proc.stdout[-3000:]
    assert min(got) >= min_step and max(got) == 2 * STEPS_PER_EPOCH - 1
    for step, loss in got.items():
        assert loss == reference["losses"][step], f"step {step}: resumed {loss} vs uninterrupted " \
                                                  f"{reference['losses'][step]}"
    final = load_checkpoint(_out_dir(base) / "checkpoint.pth.tar")
    assert final["global_step"] == reference["final"]["global_step"]
    _assert_same_weights(final["model"], reference["final"]["model"])
    _assert_same_weights(final["optimizer"]["state"][0], reference["final"]["optimizer"]["state"][0])
    return proc.stdout


# ------------------------------------------------------------------------------------------ crashes
@pytest.mark.parametrize("point", ["step", "checkpoint-write"])
@pytest.mark.slow
def test_sigkill_loses_nothing_and_the_resumed_run_matches(point, reference, tmp_path):
    log = tmp_path / "killed.log"
    out = _out_dir(tmp_path)
    env = dict(TOOL_ENV)
    if point == "step":  # in the middle of epoch 1, after the epoch-0 checkpoint
        proc = _start(_train_cmd(tmp_path), log)
        _wait_for(lambda: "] step 8 loss" in log.read_text(), proc, log)
    else:  # while the epoch-1 checkpoint is being written: the temporary file exists, not yet renamed
        env["MDEQ_TEST_SAVE_DELAY"] = "1.5"
        proc = _start(_train_cmd(tmp_path), log, env)
        _wait_for(lambda: "checkpoint saved" in log.read_text() and "] step 11 loss" in log.read_text()
                  and any(p.name.startswith(".tmp-checkpoint.pth.tar") for p in out.iterdir()), proc, log)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the newest checkpoint loads and is the epoch-0 one
    ckpt = load_checkpoint(out / "checkpoint.pth.tar")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["global_step"]) == (1, 0, STEPS_PER_EPOCH)
    assert {"model", "optimizer", "scheduler", "rng", "sampler", "best", "bad_steps", "health"} <= set(ckpt)
    if point == "checkpoint-write":
        assert any(p.name.startswith(".tmp-") for p in out.iterdir())  # the abandoned temporary file
    text = _resume_and_compare(tmp_path, reference, STEPS_PER_EPOCH)
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-")]  # cleaned up on resume
    if point == "checkpoint-write":
        assert "removing" in text and "interrupted" in text


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_the_resumed_run_matches_exactly(reference, tmp_path):
    log = tmp_path / "term.log"
    proc = _start(_train_cmd(tmp_path), log)
    _wait_for(lambda: "] step 8 loss" in log.read_text(), proc, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "stopped by SIGTERM" in text and "To resume, run the same command with TRAIN.RESUME True" in text
    assert not (_out_dir(tmp_path) / "run.lock").exists()
    ckpt = load_checkpoint(_out_dir(tmp_path) / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch_in_epoch"] < STEPS_PER_EPOCH
    assert ckpt["global_step"] == STEPS_PER_EPOCH + ckpt["batch_in_epoch"]
    last_logged = max(_losses(text))
    assert ckpt["global_step"] == last_logged + 1  # saved right after the last step that ran
    assert ckpt["epoch_partial"]["totals"]["sums"]["good"] == ckpt["batch_in_epoch"]
    resumed = _resume_and_compare(tmp_path, reference, ckpt["global_step"])
    assert f"epoch 1, global step {ckpt['global_step']}, batch {ckpt['batch_in_epoch']} of the epoch" in resumed
    # the cut epoch's line of history.jsonl covers the whole epoch, its part before the stop included
    got, want = (read_history(out / "history.jsonl")[-1] for out in (_out_dir(tmp_path), reference["out"]))
    assert got["epoch"] == want["epoch"] == 1 and got["train"]["steps"] == STEPS_PER_EPOCH
    assert got["train"] == pytest.approx(want["train"], rel=1e-12, nan_ok=True)
    assert got["epoch_time_s"] > got["eval_time_s"]


# ------------------------------------------------------------------------------------------ the best model
#: a run that learns (held-out top-1 from chance to about 40 % in its third epoch), for the tests of
#: model_best: 15 steps per epoch, the first 14 unrolled
LEARNS = {"PERCENT": "0.3", "TRAIN.BATCH_SIZE_PER_GPU": "32", "TRAIN.END_EPOCH": "3", "TRAIN.PRETRAIN_STEPS": "14",
          "MODEL.F_THRES": "6", "MODEL.B_THRES": "6", "TRAIN.OPTIMIZER": "adam", "TRAIN.LR": "0.01",
          "TRAIN.KEEP_CHECKPOINTS": "3", "DATASET.AUGMENT": "False", "PRINT_FREQ": "10"}

# the training tool with SIGTERM sent to itself during the held-out evaluation number $MDEQ_TEST_TERM_AT
_TERM_IN_EVALUATION = """import os, signal
from mdeq.tasks.classification import ClassificationTask
real_evaluate, calls = ClassificationTask.evaluate, []
def evaluate(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == int(os.environ["MDEQ_TEST_TERM_AT"]):
        os.kill(os.getpid(), signal.SIGTERM)
    return real_evaluate(self, *args, **kwargs)
ClassificationTask.evaluate = evaluate
"""


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """An uninterrupted run of LEARNS; its best comes from its last epoch, well above the others."""
    base = tmp_path_factory.mktemp("learned")
    run_process(_train_cmd(base, **LEARNS))
    out = _out_dir(base)
    best = load_checkpoint(out / "model_best.pth.tar")
    scores = [load_checkpoint(out / f"checkpoint_ep{e:04d}.pth.tar")["best"] for e in (1, 2, 3)]
    assert best["epoch"] == 3 and scores[2] == best["top1"] > scores[1] + 20, scores
    return {"base": base, "out": out, "best": best}


@pytest.mark.slow
def test_a_resume_with_a_learning_rate_that_wrecks_the_model_keeps_model_best(learned, tmp_path):
    """Resumed from the epoch copy before the best epoch with TRAIN.LR 100: the epoch trained again is
    reported unhealthy and its chance-level score, although above the copy's recorded best, replaces
    neither model_best nor the run's best."""
    shutil.copytree(learned["base"] / "output", tmp_path / "output")
    out = _out_dir(tmp_path)
    best_file = (out / "model_best.pth.tar").read_bytes()
    copy = out / "checkpoint_ep0002.pth.tar"
    proc = run_process(_train_cmd(tmp_path, **{**LEARNS, "TRAIN.RESUME": "True", "TRAIN.CHECKPOINT": str(copy),
                                                  "TRAIN.LR": "100"}))
    assert "epoch 2 looks unhealthy" in proc.all and "new best" not in proc.all
    wrecked = json.loads((out / "results.json").read_text())
    assert wrecked["top1"] > load_checkpoint(copy)["best"]   # what replaced model_best before the fix
    assert (out / "model_best.pth.tar").read_bytes() == best_file
    assert wrecked["best_top1"] == learned["best"]["top1"] == load_checkpoint(out / "checkpoint.pth.tar")["best"]


@pytest.mark.slow
def test_sigterm_during_the_held_out_evaluation_keeps_the_true_best(learned, tmp_path):
    """Stopped during the last epoch's evaluation: the epoch's checkpoint already records that epoch's
    score, so the resumed run (nothing left to train) reports the uninterrupted run's best and model_best."""
    env = dict(TOOL_ENV, MDEQ_TEST_TERM_AT="3")
    cmd = [sys.executable, *patched_tool("cls_train.py", _TERM_IN_EVALUATION), "--cfg", CFG, *_opts(tmp_path, **LEARNS)]
    stopped = run_process(cmd, expect=128 + signal.SIGTERM, env=env)
    assert "stopped by SIGTERM" in stopped.all
    out = _out_dir(tmp_path)
    ckpt = load_checkpoint(out / "checkpoint.pth.tar")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["best"]) == (3, 0, learned["best"]["top1"])
    resumed = run_process(_train_cmd(tmp_path, **LEARNS, **{"TRAIN.RESUME": "True"}))
    assert "nothing to train" in resumed.all
    assert json.loads((out / "results.json").read_text())["best_top1"] == learned["best"]["top1"]
    _assert_same_weights(load_checkpoint(out / "model_best.pth.tar")["model"], learned["best"]["model"])


# ------------------------------------------------------------------------------------------ pickles
@pytest.mark.slow
def test_a_code_running_pickle_is_refused_by_the_tools(tmp_path, evil_pickle):
    evil, marker = evil_pickle
    with pytest.raises(Exception, match="refused"):
        load_checkpoint(evil)
    runs = {
        "cls_valid": [sys.executable, "tools/cls_valid.py", "--cfg", CFG, "--testModel", evil, *_opts(tmp_path)],
        "seg_test": [sys.executable, "tools/seg_test.py", "--cfg", SEG_CFG, "--testModel", evil, "--modelDir",
                     tmp_path / "seg", "--logDir", tmp_path / "seglog", "MODEL.NUM_LAYERS", "1"],
    }
    # a planted checkpoint.pth.tar that a resumed run would read
    planted = _out_dir(tmp_path / "r")
    planted.mkdir(parents=True)
    (planted / "checkpoint.pth.tar").write_bytes(evil.read_bytes())
    runs["cls_train RESUME"] = _train_cmd(tmp_path / "r", **{"TRAIN.RESUME": "True"})
    for (name, cmd), proc in zip(runs.items(), _run_many(list(runs.values()))):
        assert proc.returncode == 2, f"{name}: {proc.all[-3000:]}"
        assert "refused to load" in proc.all and "arbitrary unpickling" in proc.all, name
        assert "Traceback" not in proc.all, name
        assert not marker.exists(), f"{name} ran the payload"
    assert (planted / "checkpoint.pth.tar").read_bytes() == evil.read_bytes()


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture()
def earlier_run(tmp_path):
    """An output folder holding an earlier run's checkpoint and log (which no failure may touch)."""
    out = _out_dir(tmp_path)
    out.mkdir(parents=True)
    save_checkpoint({"model": {"w": torch.ones(2)}, "optimizer": {}, "epoch": 3}, out / "checkpoint.pth.tar")
    (out / "earlier_train.log").write_text("the earlier run's log\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def untouched() -> None:
        for name, data in before.items():
            assert (out / name).read_bytes() == data, f"{name} was modified"

    return tmp_path, untouched


def _bad(cmd: List[str], *needles: str, proc: Optional[subprocess.CompletedProcess] = None) -> str:
    """Run ``cmd`` (or check its finished ``proc``): exit status 2, one error line holding ``needles``,
    no traceback."""
    proc = proc or run_process(cmd, expect=2)
    assert proc.returncode == 2, proc.all[-3000:]
    for n in needles:
        assert n in proc.all, f"{n!r} not in:\n{proc.all[-3000:]}"
    assert "Traceback" not in proc.all
    errors = [l for l in proc.all.splitlines() if "error:" in l]
    assert len(errors) == 1, proc.all[-3000:]
    return errors[0]


@pytest.mark.parametrize("override,needles", [
    (["TRAIN.LRR", "0.1"], ["unknown config key TRAIN.LRR", "did you mean TRAIN.LR"]),
    (["TRAIN.END_EPOCH", "many"], ["wrong type for config key TRAIN.END_EPOCH", "'many'"]),
    (["TRAIN.OPTIMIZER", "lamb"], ["TRAIN.OPTIMIZER = 'lamb'", "choose one of"]),
])
@pytest.mark.slow
def test_config_errors_are_one_line(earlier_run, override, needles):
    base, untouched = earlier_run
    _bad([*_train_cmd(base, **{"TRAIN.RESUME": "True"}), *override], *needles)
    untouched()


@pytest.mark.slow
def test_missing_config_file(tmp_path):
    _bad([sys.executable, "tools/cls_train.py", "--cfg", str(tmp_path / "nope.yaml")],
         "config file not found", "nope.yaml")


@pytest.mark.slow
def test_missing_and_empty_dataset_folders(earlier_run):
    base, untouched = earlier_run
    cifar = {"DATASET.DATASET": "cifar10", "TRAIN.RESUME": "True"}
    (base / "empty" / "cifar-10-batches-py").mkdir(parents=True)
    folder = base / "cut" / "cifar-10-batches-py"  # truncated batch files
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": b"x" * 100, b"labels": [0]})[:20])
    cases = [(str(base / "nowhere"), ("CIFAR-10 not found", "cifar-10-python.tar.gz")),
             (str(base / "empty"), ("lacks data_batch_1",)),
             (str(base / "cut"), ("cannot read CIFAR batch", "data_batch_1"))]
    # one after the other: they resume the same run, whose folder admits one run at a time
    for root, needles in cases:
        _bad(_train_cmd(base, **cifar, **{"DATASET.ROOT": root}), *needles)
    untouched()


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    return build_cityscapes_tree(tmp_path_factory.mktemp("city"))


def _seg_train(out: Path, root: Path, *opts: str) -> List[str]:
    return [sys.executable, "tools/seg_train.py", "--cfg", SEG_CFG, "--modelDir", out / "o", "--logDir",
            out / "l", "DATASET.ROOT", root, "WORKERS", "0", "TRAIN.BATCH_SIZE_PER_GPU", "1",
            "TRAIN.IMAGE_SIZE", "[64, 32]", "TRAIN.BASE_SIZE", "128", "DATASET.TEST_SET", "", *opts]


@pytest.mark.slow
def test_segmentation_list_errors_image_without_label_and_truncated_image(city, tmp_path):
    lst = city / "list" / "cityscapes"
    img = "leftImg8bit/train/aachen/aachen_000000_000000_leftImg8bit.png"
    (lst / "nolabel.lst").write_text(img + "\n")
    (lst / "empty.lst").write_text("\n")
    cases = [("list/none.lst", ("list file not found", "none.lst")),
             ("list/cityscapes/nolabel.lst", ("aachen_000000_000000_leftImg8bit.png has no label",)),
             ("list/cityscapes/empty.lst", ("is empty",))]
    procs = _run_many([_seg_train(tmp_path / str(i), city, "DATASET.TRAIN_SET", c[0]) for i, c in enumerate(cases)])
    for (_, needles), proc in zip(cases, procs):
        _bad([], *needles, proc=proc)
    # truncated images: read during training (in the DataLoader), reported as one line
    cut = city / "cityscapes" / "cut"
    cut.mkdir()
    data = (city / "cityscapes" / img).read_bytes()
    lines = []
    for i in range(2):
        (cut / f"cut{i}.png").write_bytes(data[: len(data) // 2])
        lines.append(f"cut/cut{i}.png gtFine/train/aachen/aachen_000000_00000{i}_gtFine_labelIds.png")
    (lst / "cut.lst").write_text("\n".join(lines) + "\n")
    line = _bad(_seg_train(tmp_path / "c", city, "DATASET.TRAIN_SET", "list/cityscapes/cut.lst"),
                "cannot read image", "cut")
    assert "CityscapesError" in line
    assert not (tmp_path / "c" / "o" / "cityscapes" / "seg_mdeq_SMALL" / "checkpoint.pth.tar").exists()


@pytest.mark.slow
def test_truncated_checkpoint(earlier_run, reference):
    base, _ = earlier_run
    out = _out_dir(base)
    data = reference["epoch1"].read_bytes()
    (out / "checkpoint.pth.tar").write_bytes(data[: len(data) // 2])
    save_checkpoint(load_checkpoint(reference["epoch1"]), out / "checkpoint_ep0001.pth.tar")
    before = (out / "checkpoint.pth.tar").read_bytes()
    _bad(_train_cmd(base, **{"TRAIN.RESUME": "True"}), "cannot resume", "truncated or corrupt",
         "checkpoint_ep0001.pth.tar", "TRAIN.CHECKPOINT")
    assert (out / "checkpoint.pth.tar").read_bytes() == before
    _bad([sys.executable, "tools/cls_valid.py", "--cfg", CFG, "--testModel", out / "checkpoint.pth.tar",
          *_opts(base)], "truncated or corrupt")


@pytest.mark.slow
def test_checkpoint_of_another_architecture(reference, tmp_path):
    line = _bad([sys.executable, "tools/cls_valid.py", "--cfg", CFG, "--testModel", reference["out"] / "final_state.pth",
                 *_opts(tmp_path), "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 32]"],
                "does not fit this model", "shape mismatches", "checkpoint (16,", "vs model (8,")
    assert "CheckpointError" in line


def test_output_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    _bad(_train_cmd(tmp_path, OUTPUT_DIR=str(blocker / "out")), "output folder", "cannot be written",
         "OUTPUT_DIR")
    assert blocker.read_text() == "not a folder"


def test_a_fresh_run_does_not_overwrite_an_earlier_checkpoint(earlier_run):
    base, untouched = earlier_run
    _bad(_train_cmd(base), "exists (an earlier run)", "TRAIN.RESUME True")
    untouched()
    assert not (_out_dir(base) / "run.lock").exists()   # the refused run gave its lock back


# ------------------------------------------------------------------------------------------ one run per folder
_HOLD_LOCK = """import sys, time
from mdeq.utils.run_lock import OutputLock
OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    from mdeq.utils.run_lock import LOCK_NAME, OutputLock, OutputLockedError
    log = tmp_path / "holder.log"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(tmp_path / "run")], env=TOOL_ENV,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    _wait_for(lambda: "locked" in log.read_text(), holder, log)
    with pytest.raises(OutputLockedError, match=f"{tmp_path / 'run'} is in use by another training run "
                                                f"\\(pid {holder.pid} on "):
        OutputLock(tmp_path / "run").acquire()
    holder.send_signal(signal.SIGKILL)   # no chance to give the lock back
    holder.wait()
    assert (tmp_path / "run" / LOCK_NAME).exists()
    with caplog.at_level("WARNING"):
        lock = OutputLock(tmp_path / "run").acquire()
    assert f"taking over the lock {tmp_path / 'run' / LOCK_NAME}" in caplog.text and f"pid {holder.pid} " in caplog.text
    assert json.loads((tmp_path / "run" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()
    # without flock (a file system that lacks it) the recorded pid decides: a dead one is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    import fcntl
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fcntl, "flock", lambda fd, op: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
        OutputLock(tmp_path / "run").acquire().release()
        (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
        with pytest.raises(OutputLockedError, match=f"pid {os.getppid()} on"):
            OutputLock(tmp_path / "run").acquire()


@pytest.mark.slow
def test_a_second_training_run_in_a_folder_in_use_is_refused_in_one_line(tmp_path):
    """This test holds the folder's lock as a running training would: the tool refuses at once, naming
    the folder and the pid, and writes nothing there (no log file); under torchrun both ranks refuse."""
    from mdeq.utils.run_lock import LOCK_NAME, OutputLock
    out = _out_dir(tmp_path)
    lock = OutputLock(out).acquire()
    try:
        line = _bad(_train_cmd(tmp_path), "OutputLockedError", f"the output folder {out} is in use by another "
                    f"training run (pid {os.getpid()} on", "--modelDir")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
        ddp = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "tools/cls_train.py", "--cfg", CFG, *_opts(tmp_path)], expect=None, timeout=180)
        assert ddp.returncode != 0 and ddp.all.count(line.split("error: ", 1)[1]) >= 2, ddp.all[-3000:]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    finally:
        lock.release()


def test_more_processes_than_devices(monkeypatch):
    from mdeq.utils import distributed
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    with pytest.raises(distributed.DeviceError, match=r"LOCAL_RANK=3 has no GPU: only 1 visible.*nproc_per_node=1"):
        distributed.init_distributed()
    from mdeq.programs.cli import BAD_INPUT
    assert issubclass(distributed.DeviceError, BAD_INPUT)


def test_truncated_imagenet_image_names_the_file(tmp_path):
    from PIL import Image
    from mdeq.datasets.common import DatasetError
    from mdeq.datasets.imagenet import pil_loader
    path = tmp_path / "x.JPEG"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, quality=95)
    assert pil_loader(str(path)).size == (64, 64)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"cannot read image .*x.JPEG.*truncated"):
        pil_loader(str(path))


# ------------------------------------------------------------------------------------------ divergence
@pytest.mark.slow
def test_absurd_learning_rate_skips_steps_then_stops_and_keeps_the_last_good_checkpoint(reference, tmp_path):
    out = _out_dir(tmp_path)
    out.mkdir(parents=True)
    good = out / "checkpoint.pth.tar"
    good.write_bytes(reference["epoch1"].read_bytes())
    before = good.read_bytes()
    work = tmp_path / "cwd"
    work.mkdir()
    cmd = _train_cmd(tmp_path, **{"TRAIN.RESUME": "True", "TRAIN.LR": "1e6", "TRAIN.MAX_BAD_STEPS": "3",
                                  "TRAIN.END_EPOCH": "3"})
    proc = run_process(cmd, expect=3, cwd=work)
    skipped = [l for l in proc.all.splitlines() if "update skipped" in l]
    assert len(skipped) >= 3 and all("solver: mode=" in l for l in skipped)
    assert "training diverged: 3 consecutive steps" in proc.all
    assert f"The last checkpoint from before the trouble is {good} (epoch 1, batch 0, global step 6)" in proc.all
    assert "TRAIN.LR differs from the checkpoint's" in proc.all
    assert "Traceback" not in proc.all
    assert good.read_bytes() == before  # the last good checkpoint is intact
    assert not any(p.name.startswith("checkpoint_ep") for p in out.iterdir())
    assert list(work.iterdir()) == []  # nothing (no tensor pickles) dumped into the working directory


# ------------------------------------------------------------------------------------------ health
@pytest.mark.slow
def test_a_run_gone_bad_is_reported_and_the_stop_option_stops_it_keeping_the_last_checkpoint(tmp_path):
    """TRAIN.LR 100 with Adam: the loss stays finite (no step is skipped), the model collapses to chance.
    The first equilibrium epoch (epoch 1) is reported with its solver numbers; by default the run goes
    on and keeps the state from before that epoch; with TRAIN.STOP_ON_UNHEALTHY it stops (exit 3)
    before that epoch's state overwrites the checkpoint."""
    bad = {"TRAIN.OPTIMIZER": "adam", "TRAIN.LR": "100", "TRAIN.PRETRAIN_STEPS": "6", "MODEL.F_THRES": "6",
           "MODEL.B_THRES": "6", "TRAIN.KEEP_CHECKPOINTS": "1"}
    warn_base, stop_base = tmp_path / "warn", tmp_path / "stop"
    with ThreadPoolExecutor(max_workers=2) as pool:
        warned = pool.submit(run_process, _train_cmd(warn_base, **bad), 0)
        stopped = pool.submit(run_process, _train_cmd(stop_base, **bad, **{"TRAIN.STOP_ON_UNHEALTHY": "True"}), 3)
        warned, stopped = warned.result(), stopped.result()
    assert "update skipped" not in warned.all  # the step guard alone would not notice
    line = next(l for l in warned.all.splitlines() if "epoch 1 looks unhealthy" in l)
    assert "at chance level" in line and "backward fallbacks" in line and "final forward relative residual" in line
    assert "TRAIN.STOP_ON_UNHEALTHY True stops such a run" in line
    kept = load_checkpoint(_out_dir(warn_base) / "checkpoint_healthy.pth.tar")
    assert (kept["epoch"], kept["global_step"]) == (1, STEPS_PER_EPOCH)

    assert "training is unhealthy at epoch 1 (TRAIN.STOP_ON_UNHEALTHY)" in stopped.all
    assert "backward fallbacks" in stopped.all and "Traceback" not in stopped.all
    last = load_checkpoint(_out_dir(stop_base) / "checkpoint.pth.tar")
    assert (last["epoch"], last["global_step"]) == (1, STEPS_PER_EPOCH)  # the state from before epoch 1
