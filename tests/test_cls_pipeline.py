"""The classification pipeline end to end: data, training / evaluation scripts, DDP, resume.

The scripts run as subprocesses, exactly as a user runs them, on a small CIFAR-format data set
built from scikit-learn's digits (real images in the real ``cifar-10-batches-py`` format).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import run_process
from mdeq.config import ConfigError, load_config, validate_config
from mdeq.modules.equilibrium import EquilibriumInfo
from mdeq.tasks.classification import ClassificationTask, validate
from mdeq.core.metrics import accuracy, topk_correct
from mdeq.datasets import build_cls_datasets
from mdeq.datasets.cifar import MEAN, STD
from mdeq.models import get_cls_net
from mdeq.utils.checkpoint import load_checkpoint
from mdeq.utils.optim import build_optimizer, build_scheduler, load_scheduler_state

DIGITS_CFG = "experiments/digits/cls_mdeq_digits.yaml"
TINY_CFG = "experiments/cifar/cls_mdeq_TINY.yaml"


# ------------------------------------------------------------------------------------------ data
def _digits_as_cifar_uint8():
    """The 1,797 digits as CIFAR rows (N, 3072) uint8, encoded so that CIFAR's mean/std
    normalisation gives (almost) the digits' own normalisation (x/16 - 0.3)/0.4."""
    from mdeq.datasets.digits import digits_tensors
    x, y = digits_tensors(32)  # normalised (N, 3, 32, 32)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    img = (mean + std * x).clamp(0, 1).mul(255).round().to(torch.uint8)
    return img.reshape(len(y), 3072).numpy(), y.tolist()


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """``ROOT/cifar-10-batches-py`` with data_batch_1..5 (1,497 images), test_batch (300), batches.meta."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    data, labels = _digits_as_cifar_uint8()
    perm = np.random.RandomState(0).permutation(len(labels))
    train_idx, test_idx = perm[:1497], perm[1497:]
    for b, chunk in enumerate(np.array_split(train_idx, 5), start=1):
        batch = {b"batch_label": f"training batch {b} of 5".encode(), b"data": data[chunk],
                 b"labels": [labels[i] for i in chunk], b"filenames": [f"digit_{i}.png".encode() for i in chunk]}
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump(batch, f)
    test = {b"batch_label": b"testing batch 1 of 1", b"data": data[test_idx],
            b"labels": [labels[i] for i in test_idx], b"filenames": [f"digit_{i}.png".encode() for i in test_idx]}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(test, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [str(i).encode() for i in range(10)], b"num_cases_per_batch": 300,
                     b"num_vis": 3072}, f)
    return root


def _small_opts(root: Path, out: Path, **extra) -> list:
    """The digits model on the CIFAR-format data, 15% of the training set, a 3-step warm-up."""
    opts = {"DATASET.DATASET": "cifar10", "DATASET.ROOT": str(root), "DATASET.AUGMENT": "True",
            "OUTPUT_DIR": str(out / "output"), "LOG_DIR": str(out / "log"), "PERCENT": "0.15",
            "TRAIN.BATCH_SIZE_PER_GPU": "32", "TRAIN.END_EPOCH": "1", "TRAIN.PRETRAIN_STEPS": "3",
            "MODEL.F_THRES": "6", "MODEL.B_THRES": "6", "TEST.BATCH_SIZE_PER_GPU": "100", "WORKERS": "0"}
    opts.update(extra)
    return [s for kv in opts.items() for s in kv]


def _state_sum(sd: dict) -> float:
    return float(sum(v.double().sum().item() for v in sd.values() if v.is_floating_point()))


# ------------------------------------------------------------------------------------------ unit
def test_topk_and_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    assert topk_correct(logits, target, (1, 2, 5)) == [1, 2, 3]  # k capped at 3 classes
    assert accuracy(logits, target, (1,))[0] == pytest.approx(100 / 3)


def test_datasets_digits_split_percent_and_errors(tmp_path):
    cfg = load_config(DIGITS_CFG)
    train, val = build_cls_datasets(cfg)
    assert (len(train), len(val)) == (1497, 300)
    x, y = val[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert torch.allclose(x.min(), torch.tensor(-0.75))  # background (0/16 - 0.3)/0.4
    train2, _ = build_cls_datasets(load_config(DIGITS_CFG, ["PERCENT", 0.1]))
    assert len(train2) == 150
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
        build_cls_datasets(load_config(TINY_CFG, ["DATASET.ROOT", str(tmp_path / "none")]))
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="val"):
        build_cls_datasets(load_config(None, ["DATASET.DATASET", "imagenet", "DATASET.ROOT", str(tmp_path / "imagenet")]))


def test_digits_file_reader_equals_scikit_learns_load_digits():
    from sklearn.datasets import load_digits

    from mdeq.datasets.digits import digits_tensors
    d = load_digits()
    x, y = digits_tensors(8)  # 8x8 -> 8x8: the bilinear resize is the identity
    assert torch.equal(y, torch.as_tensor(d.target, dtype=torch.int64))
    expected = ((torch.as_tensor(d.images, dtype=torch.float32) / 16.0 - 0.3) / 0.4).unsqueeze(1).repeat(1, 3, 1, 1)
    assert x.shape == (1797, 3, 8, 8) and torch.allclose(x, expected, atol=1e-6)


def test_cifar_reader_and_safe_unpickling(cifar_root, tmp_path):
    cfg = load_config(TINY_CFG, ["DATASET.ROOT", str(cifar_root), "DATASET.AUGMENT", False])
    train, val = build_cls_datasets(cfg)
    assert (len(train), len(val)) == (1497, 300)
    assert train.classes == [str(i) for i in range(10)]
    # CIFAR normalisation of the encoded digits is close to the digits' own normalisation
    x, _ = val[0]
    assert float(x.min()) == pytest.approx(-0.75, abs=0.03)
    # a batch file that would run code is refused
    bad = tmp_path / "bad" / "cifar-10-batches-py"
    shutil.copytree(cifar_root / "cifar-10-batches-py", bad)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(bad / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(RuntimeError, match="refusing to load"):
        build_cls_datasets(load_config(TINY_CFG, ["DATASET.ROOT", str(tmp_path / "bad")]))


def test_labels_are_checked_when_the_dataset_is_built(cifar_root, tmp_path):
    """A CIFAR label outside 0..9 (training or test batch) and an ImageNet tree whose class folders do
    not match MODEL.NUM_CLASSES are one line naming the file or folder and the value, before training."""
    from mdeq.tasks.classification import ClassificationTask
    from mdeq.datasets.common import DatasetError
    for name, index, value in (("data_batch_3", 5, 12), ("test_batch", 0, -1)):
        bad = tmp_path / name / "cifar-10-batches-py"
        shutil.copytree(cifar_root / "cifar-10-batches-py", bad)
        with open(bad / name, "rb") as f:
            batch = pickle.load(f)
        batch[b"labels"][index] = value
        with open(bad / name, "wb") as f:
            pickle.dump(batch, f)
        cfg = load_config(TINY_CFG, ["DATASET.ROOT", str(tmp_path / name)])
        with pytest.raises(DatasetError, match=f"CIFAR batch {bad / name}: label {value} \\(sample {index}\\) is "
                                               f"outside the 10 classes 0..9"):
            build_cls_datasets(cfg)
    from PIL import Image
    for split in ("train", "val"):
        for c in ("n01", "n02", "n03"):
            (tmp_path / "imagenet" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "imagenet" / split / c / "a.JPEG")
    cfg = load_config("experiments/imagenet/cls_mdeq_SMALL.yaml", ["DATASET.ROOT", str(tmp_path / "imagenet")])
    with pytest.raises(ConfigError, match=f"MODEL.NUM_CLASSES = 1000 but DATASET.DATASET 'imagenet' has 3 classes "
                                          f"in {tmp_path / 'imagenet' / 'val'}"):
        ClassificationTask().build_datasets(cfg)


def test_scheduler_resume_is_exact():
    cfg = load_config(DIGITS_CFG, ["TRAIN.OPTIMIZER", "sgd", "TRAIN.NESTEROV", True, "TRAIN.END_EPOCH", 4])
    for sched in ("cosine", "step"):
        c = load_config(DIGITS_CFG, ["TRAIN.LR_SCHEDULER", sched, "TRAIN.LR_STEP", [1, 3], "TRAIN.END_EPOCH", 4])
        p = [nn.Parameter(torch.zeros(1))]
        opt, opt2 = build_optimizer(c, p), build_optimizer(c, [nn.Parameter(torch.zeros(1))])
        s = build_scheduler(c, opt, 10)
        lrs = []
        for _ in range(40):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            s.step()
        s2 = build_scheduler(c, opt2, 10)
        s_mid = build_scheduler(c, build_optimizer(c, [nn.Parameter(torch.zeros(1))]), 10)
        for _ in range(17):
            s_mid.optimizer.step()
            s_mid.step()
        load_scheduler_state(s2, s_mid.state_dict())
        assert opt2.param_groups[0]["lr"] == lrs[17]
        if sched == "step":
            assert lrs[9] == pytest.approx(c.TRAIN.LR) and lrs[10] == pytest.approx(c.TRAIN.LR * c.TRAIN.LR_FACTOR)
            assert lrs[30] == pytest.approx(c.TRAIN.LR * c.TRAIN.LR_FACTOR ** 2)
        else:
            assert lrs[0] == c.TRAIN.LR and lrs[20] == pytest.approx((c.TRAIN.LR + 1e-6) / 2, rel=1e-6)
    assert isinstance(build_optimizer(cfg, [nn.Parameter(torch.zeros(1))]), torch.optim.SGD)
    with pytest.raises(ValueError, match="TRAIN.OPTIMIZER"):
        build_optimizer(load_config(DIGITS_CFG, ["TRAIN.OPTIMIZER", "lamb"]), [nn.Parameter(torch.zeros(1))])


# ------------------------------------------------------------------------------------------ scripts
@pytest.mark.slow
def test_train_then_valid_scripts(cifar_root, tmp_path):
    proc = run_process([sys.executable, "tools/cls_train.py", "--cfg", DIGITS_CFG, *_small_opts(cifar_root, tmp_path)])
    out = tmp_path / "output" / "cifar10" / "cls_mdeq_digits"
    for name in ("checkpoint.pth.tar", "final_state.pth", "results.json", "history.jsonl"):
        assert (out / name).is_file(), name
    logs = list(out.glob("cls_mdeq_digits_train_*.log"))
    assert len(logs) == 1
    log = logs[0].read_text()
    # its one epoch (8 steps) may end at chance level, which the health check flags: then no model_best
    healthy = "epoch 0 looks unhealthy" not in log
    assert (out / "model_best.pth.tar").is_file() == healthy == ("new best top1" in log)
    assert "done: held-out loss" in log and "done: held-out loss" in proc.stdout
    assert "\r" not in proc.stdout + proc.stderr  # no progress bar when the output is not a terminal
    assert "trainable parameters" in log and "MFLOPs" in log
    assert list((tmp_path / "log" / "cifar10").glob("*/events.out.tfevents.*"))
    ckpt = load_checkpoint(out / "checkpoint.pth.tar")
    steps = math.ceil(round(1497 * 0.15) / 32)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == steps
    assert {"model", "optimizer", "scheduler", "best", "best_metric", "config", "rng", "health"} <= set(ckpt)
    res = json.loads((out / "results.json").read_text())
    assert 0.0 <= res["top1"] <= 100.0 and res["top5"] >= res["top1"] and res["global_step"] == steps

    proc = run_process([sys.executable, "tools/cls_valid.py", "--cfg", DIGITS_CFG,
                 "--testModel", str(out / "final_state.pth"), *_small_opts(cifar_root, tmp_path)])
    assert "held-out (cifar10, 300 images): top-1" in proc.stdout
    vres = json.loads((out / "valid_results.json").read_text())
    assert vres["num_samples"] == 300 and vres["top1"] == pytest.approx(res["top1"])
    assert vres["f_steps"] > 0 and vres["f_rel"] >= 0


@pytest.mark.slow
def test_torchrun_two_processes(cifar_root, tmp_path):
    proc = run_process([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                 "tools/cls_train.py", "--cfg", DIGITS_CFG, *_small_opts(cifar_root, tmp_path)], timeout=300)
    out = tmp_path / "output" / "cifar10" / "cls_mdeq_digits"
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2
    c0, c1 = res["rank_checksums"]
    assert c0 == pytest.approx(c1, rel=1e-12, abs=1e-9), "ranks hold different weights"
    # the saved weights are the ones both ranks hold
    names = {k for k, _ in get_cls_net(load_config(DIGITS_CFG)).named_parameters()}
    sd = load_checkpoint(out / "final_state.pth")
    assert _state_sum({k: v for k, v in sd.items() if k in names}) == pytest.approx(c0, rel=1e-12)
    # each rank ran half of every epoch's batches
    n = round(1497 * 0.15)
    assert res["global_step"] == math.ceil(math.ceil(n / 2) / 32)
    # only rank 0 wrote: one log file, one TensorBoard folder
    assert len(list(out.glob("*.log"))) == 1
    assert len(list((tmp_path / "log" / "cifar10").iterdir())) == 1
    assert "identical" in proc.stdout
    assert not (out / "run.lock").exists()   # rank 0's lock of the folder was given back


@pytest.mark.slow
def test_torchrun_non_finite_loss_on_one_rank_is_skipped_by_both(cifar_root, tmp_path):
    """Rank 1 alone sees a NaN loss at step 3 (the first equilibrium step): both ranks skip it, stay in
    step (no hang, no half-finished DDP reduction) and end with identical parameters."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "tests/nan_on_one_rank.py", "cls", "--cfg", DIGITS_CFG, *_small_opts(cifar_root, tmp_path)]
    text = run_process(cmd, timeout=300, NAN_RANK="1", NAN_STEP="3").all
    res = json.loads((tmp_path / "output" / "cifar10" / "cls_mdeq_digits" / "results.json").read_text())
    assert res["world_size"] == 2 and res["skipped_steps"] == 1
    assert res["global_step"] == math.ceil(math.ceil(round(1497 * 0.15) / 2) / 32)  # the skipped step counts
    c0, c1 = res["rank_checksums"]
    assert c0 == pytest.approx(c1, rel=1e-12, abs=1e-9), "ranks hold different weights"
    assert "step 3: non-finite loss" in text and "update skipped" in text


@pytest.mark.slow
def test_resume_continues_at_the_right_epoch_and_lr(cifar_root, tmp_path):
    opts = dict(**{"TRAIN.END_EPOCH": "2", "TRAIN.KEEP_CHECKPOINTS": "2", "DETERMINISTIC": "True"})
    full = tmp_path / "full"
    run_process([sys.executable, "tools/cls_train.py", "--cfg", DIGITS_CFG, *_small_opts(cifar_root, full, **opts)])
    out_full = full / "output" / "cifar10" / "cls_mdeq_digits"
    ref = load_checkpoint(out_full / "checkpoint.pth.tar")
    after1 = load_checkpoint(out_full / "checkpoint_ep0001.pth.tar")
    assert after1["epoch"] == 1 and ref["epoch"] == 2

    # a run that was stopped after epoch 1: its output folder holds the epoch-1 checkpoint
    part = tmp_path / "part"
    out_part = part / "output" / "cifar10" / "cls_mdeq_digits"
    out_part.mkdir(parents=True)
    shutil.copy(out_full / "checkpoint_ep0001.pth.tar", out_part / "checkpoint.pth.tar")
    proc = run_process([sys.executable, "tools/cls_train.py", "--cfg", DIGITS_CFG,
                 *_small_opts(cifar_root, part, **opts, **{"TRAIN.RESUME": "True"})])
    assert f"resumed from {out_part / 'checkpoint.pth.tar'}: epoch 1, global step {after1['global_step']}" in proc.stdout
    assert "training epochs 1..1" in proc.stdout
    got = load_checkpoint(out_part / "checkpoint.pth.tar")
    assert got["epoch"] == 2 and got["global_step"] == ref["global_step"]
    assert got["lr"] == ref["lr"] and got["scheduler"]["last_epoch"] == ref["scheduler"]["last_epoch"]
    assert got["optimizer"]["param_groups"][0]["lr"] == ref["optimizer"]["param_groups"][0]["lr"]
    assert ref["lr"] < after1["lr"]  # the cosine schedule moved on
    # same data order, same RNG streams: the resumed run ends with the same weights
    for k, v in ref["model"].items():
        if v.is_floating_point():
            torch.testing.assert_close(got["model"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # resuming the finished run trains nothing and says so
    proc = run_process([sys.executable, "tools/cls_train.py", "--cfg", DIGITS_CFG,
                 *_small_opts(cifar_root, part, **opts, **{"TRAIN.RESUME": "True"})])
    assert ("the run is finished (the checkpoint is at epoch 2, TRAIN.END_EPOCH is 2): nothing to train"
            in proc.stdout) and "training epochs" not in proc.stdout
    assert load_checkpoint(out_part / "checkpoint.pth.tar")["global_step"] == ref["global_step"]


@pytest.mark.slow
def test_valid_script_on_original_checkpoint(cifar_root, tmp_path, reference):
    pkl = reference / "cifar_tiny.pkl"
    opts = ["DATASET.ROOT", str(cifar_root), "OUTPUT_DIR", str(tmp_path / "o"), "LOG_DIR", str(tmp_path / "l"),
            "TEST.BATCH_SIZE_PER_GPU", "100", "WORKERS", "0", "MODEL.F_THRES", "8"]
    proc = run_process([sys.executable, "tools/cls_valid.py", "--cfg", TINY_CFG, "--testModel", str(pkl), *opts])
    assert "held-out (cifar10, 300 images): top-1" in proc.stdout
    res = json.loads((tmp_path / "o" / "cifar10" / "cls_mdeq_TINY" / "valid_results.json").read_text())
    assert res["num_samples"] == 300 and res["parameters"] == 158986  # the original's count
    # the script's figures are those of the original weights evaluated here, batch by batch
    cfg = load_config(TINY_CFG, opts)
    from mdeq.utils.checkpoint import load_weights
    model = get_cls_net(cfg)
    load_weights(model, pkl)
    _, val = build_cls_datasets(cfg)
    loader = torch.utils.data.DataLoader(val, batch_size=100)
    mine = validate(model, loader, cfg, torch.device("cpu"), is_main=False)
    assert res["top1"] == pytest.approx(mine["top1"]) and res["loss"] == pytest.approx(mine["loss"], rel=1e-5)


class _LinearWithInfo(nn.Module):
    """Logits of a linear map of the flattened image, not mirror-symmetric; info with a fake residual."""

    def __init__(self, pixels: int, classes: int = 10) -> None:
        super().__init__()
        self.fc = nn.Linear(pixels, classes)

    def forward(self, x, return_info=False, **kwargs):
        logits = self.fc(x.flatten(1))
        # the "residual" differs between an image and its mirror, so the average can be checked
        info = EquilibriumInfo(mode="equilibrium", f_steps=3.0, f_rel=float(x[..., 0].abs().mean()))
        return (logits, info) if return_info else logits


def test_flip_test_averages_the_mirror_images_logits_and_label_smoothing_is_the_training_loss():
    torch.manual_seed(0)
    images, target = torch.randn(12, 1, 6, 6), torch.randint(0, 10, (12,))
    model = _LinearWithInfo(36)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, target), batch_size=5)
    cfg = load_config(TINY_CFG)
    plain = validate(model, loader, cfg, torch.device("cpu"), is_main=False)
    cfg.defrost()
    cfg.TEST.FLIP_TEST = True
    flipped = validate(model, loader, cfg, torch.device("cpu"), is_main=False)
    with torch.no_grad():
        logits = model(images)
        both = 0.5 * (logits + model(images.flip(-1)))
    for result, expected in ((plain, logits), (flipped, both)):
        assert result["top1"] == pytest.approx(100.0 * (expected.argmax(1) == target).float().mean().item())
        assert result["loss"] == pytest.approx(nn.functional.cross_entropy(expected, target).item(), rel=1e-5)
    assert flipped["loss"] != pytest.approx(plain["loss"])
    # the residual: the mean over both passes (first and last pixel columns of the images)
    assert flipped["f_rel"] == pytest.approx(0.5 * (images[..., 0].abs().mean() + images[..., -1].abs().mean()).item(),
                                             rel=1e-5)

    cfg.LOSS.LABEL_SMOOTHING = 0.1
    loss = ClassificationTask().build_criterion(cfg)(logits, target)
    logp = torch.log_softmax(logits, 1)
    expected = 0.9 * nn.functional.nll_loss(logp, target) - 0.1 * logp.mean(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    cfg.LOSS.LABEL_SMOOTHING = 1.0
    with pytest.raises(ConfigError, match="LOSS.LABEL_SMOOTHING"):
        validate_config(cfg, "the test")
