"""The Cityscapes segmentation pipeline on a small Cityscapes-format tree made of real photographs.

The tree (built once per session under tmp): tiles of scikit-learn's two sample photographs
(china.jpg, flower.jpg), 128x64, as ``leftImg8bit/{train,val,test}/<city>/..._leftImg8bit.png``,
with label-id images ``gtFine/.../..._gtFine_labelIds.png`` whose ids come from the quantised
brightness of the photograph plus a band that holds every id 0..33 (the ignored ones included).
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CITY_TILE_H, CITY_TILE_W, SEG_CFG, SEG_TINY, build_cityscapes_tree, run_process
from mdeq.core.criterion import CrossEntropy, OhemCrossEntropy, build_criterion
from mdeq.core.seg_metrics import confusion_matrix, scores_from_confusion
from mdeq.datasets.cityscapes import (CLASS_NAMES, LABELS, PALETTE, CityscapesDataset, CityscapesError,
                                      label_ids_to_train_ids, train_ids_to_label_ids)

REPO = Path(__file__).resolve().parents[1]
TILE_W, TILE_H = CITY_TILE_W, CITY_TILE_H


@pytest.fixture(scope="session")
def city_root(tmp_path_factory) -> Path:
    return build_cityscapes_tree(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------------------------------- labels
def test_label_table_is_the_official_one():
    labels = pytest.importorskip("cityscapesscripts.helpers.labels")
    official = {(l.name, l.id, l.trainId if l.trainId != -1 else 255, tuple(l.color)) for l in labels.labels}
    ours = {(l.name, l.id, l.train_id, tuple(l.color)) for l in LABELS}
    assert ours == official
    ids = np.arange(-1, 34)
    expected = np.array([labels.id2label[i].trainId for i in ids])
    expected[expected < 0] = 255
    assert np.array_equal(label_ids_to_train_ids(ids), expected)
    # train id -> label id is the inverse on the 19 classes, and the palette is the official colours
    assert np.array_equal(label_ids_to_train_ids(train_ids_to_label_ids(np.arange(19))), np.arange(19))
    for t in range(19):
        assert tuple(PALETTE[t]) == tuple(labels.trainId2label[t].color)
        assert CLASS_NAMES[t] == labels.trainId2label[t].name


# ---------------------------------------------------------------------------------------------- dataset
def test_dataset_splits(city_root):
    val = CityscapesDataset(str(city_root), "list/cityscapes/val.lst", train=False)
    assert len(val) == 4 and val.labeled
    image, label, name = val[0]
    assert image.shape == (3, TILE_H, TILE_W) and image.dtype == torch.float32
    assert name == "frankfurt_000000_000000_leftImg8bit"
    ids = cv2.imread(str(city_root / "cityscapes/gtFine/val/frankfurt/frankfurt_000000_000000_gtFine_labelIds.png"),
                     cv2.IMREAD_UNCHANGED)
    assert np.array_equal(label.numpy(), label_ids_to_train_ids(ids))
    assert set(np.unique(label.numpy())) <= set(range(19)) | {255}
    assert (label == 255).any() and (label < 19).any()
    # normalisation: the image is the RGB photograph, ImageNet-normalised
    rgb = cv2.cvtColor(cv2.imread(val.files[0]["img"]), cv2.COLOR_BGR2RGB).astype(np.float32) / 255
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    assert np.allclose(image.permute(1, 2, 0).numpy(), (rgb - mean) / std, atol=1e-5)

    test = CityscapesDataset(str(city_root), "list/cityscapes/test.lst", train=False, labeled=None)
    assert not test.labeled and len(test) == 2
    _, tlabel, _ = test[1]
    assert (tlabel == 255).all()

    # training: multi-scale crops of TRAIN.IMAGE_SIZE, padded with the ignore label when the image is small
    train = CityscapesDataset(str(city_root), "list/cityscapes/train.lst", train=True, crop_size=(48, 96),
                              base_size=128, multi_scale=True, scale_factor=16, flip=True)
    import random
    random.seed(0)
    padded = 0
    for _ in range(20):
        img, lab, _ = train[0]
        assert img.shape == (3, 48, 96) and lab.shape == (48, 96)
        assert set(np.unique(lab.numpy())) <= set(range(19)) | {255}
        pad = (img.abs().sum(0) == 0) & (lab == 255)
        padded += int(pad.any())
    assert padded > 0  # scale 0.5 gives 64x32 images, smaller than the 96x48 crop


def test_dataset_errors(city_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nolist.lst"):
        CityscapesDataset(str(city_root), "list/cityscapes/nolist.lst")
    (tmp_path / "list").mkdir()
    cs = tmp_path / "cityscapes"
    cs.mkdir()
    os.symlink(city_root / "cityscapes" / "leftImg8bit", cs / "leftImg8bit")
    (cs / "gtFine").mkdir()
    img = "leftImg8bit/val/frankfurt/frankfurt_000000_000000_leftImg8bit.png"
    lab = "gtFine/val/frankfurt/frankfurt_000000_000000_gtFine_labelIds.png"
    # an image without its label in a labelled list
    (tmp_path / "list" / "nolabel.lst").write_text(img + "\n")
    with pytest.raises(CityscapesError, match="frankfurt_000000_000000_leftImg8bit.png has no label"):
        CityscapesDataset(str(tmp_path), "list/nolabel.lst", train=True)
    # a label file that does not exist
    (tmp_path / "list" / "missing.lst").write_text(f"{img} {lab}\n")
    with pytest.raises(FileNotFoundError, match="frankfurt_000000_000000_gtFine_labelIds.png"):
        CityscapesDataset(str(tmp_path), "list/missing.lst")
    # a label of another size
    (cs / lab).parent.mkdir(parents=True)
    cv2.imwrite(str(cs / lab), np.zeros((10, 20), np.uint8))
    ds = CityscapesDataset(str(tmp_path), "list/missing.lst")
    with pytest.raises(CityscapesError, match="is 128x64 but its label .* is 20x10"):
        ds[0]
    # an unreadable image
    bad = cs / "leftImg8bit_bad.png"
    bad.write_bytes(b"not a png")
    (tmp_path / "list" / "bad.lst").write_text(f"leftImg8bit_bad.png {lab}\n")
    ds = CityscapesDataset(str(tmp_path), "list/bad.lst")
    with pytest.raises(CityscapesError, match="cannot read image .*leftImg8bit_bad.png"):
        ds[0]


# ---------------------------------------------------------------------------------------------- losses
def test_cross_entropy_and_ohem():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 8, 16, requires_grad=True)
    target = torch.randint(0, 19, (2, 32, 64))
    target[:, :4] = 255
    up = F.interpolate(logits, size=(32, 64), mode="bilinear", align_corners=False)
    ce = CrossEntropy(255)(logits, target)
    assert torch.allclose(ce, F.cross_entropy(up, target, ignore_index=255))
    # all pixels ignored: a zero loss with a graph, not NaN
    zero = CrossEntropy(255)(logits, torch.full_like(target, 255))
    assert zero.item() == 0.0 and zero.requires_grad
    # OHEM: the mean loss over pixels whose true-class probability is under the threshold (enough of them)
    prob = F.softmax(up, 1)
    valid = target != 255
    true_p = prob.gather(1, target.clamp(max=18).unsqueeze(1)).squeeze(1)[valid]
    pix = F.cross_entropy(up, target, ignore_index=255, reduction="none")[valid]
    ohem = OhemCrossEntropy(255, thres=0.05, min_kept=10)(logits, target)
    assert (true_p < 0.05).sum() > 10
    assert torch.allclose(ohem, pix[true_p < 0.05].mean())
    # min_kept above the number under the threshold: keeps at least min_kept, the hardest ones
    k = int((true_p < 0.05).sum()) + 500
    ohem_k = OhemCrossEntropy(255, thres=0.05, min_kept=k)(logits, target)
    hardest = torch.sort(true_p).indices[:k]
    assert torch.allclose(ohem_k, pix[hardest].mean(), atol=1e-6)
    assert ohem_k < ohem  # easier pixels join, the mean loss drops
    from mdeq.config import load_config
    cfg = load_config(REPO / "experiments/cityscapes/seg_mdeq_SMALL.yaml", ["LOSS.USE_OHEM", True])
    crit = build_criterion(cfg)
    assert isinstance(crit, OhemCrossEntropy) and crit.min_kept == 131072 and crit.ignore_label == 255


# ---------------------------------------------------------------------------------------------- metrics
def _official_eval(pred_files, gt_files):
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    args = ev.args
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = False
    args.quiet = True
    return ev.evaluateImgLists([str(p) for p in pred_files], [str(g) for g in gt_files], args)


def _assert_same_scores(ours, official):
    names = [l.name for l in LABELS if 0 <= l.train_id < 19]
    assert len(names) == 19
    compared = 0
    for t, name in enumerate(CLASS_NAMES):
        a, b = ours["iou_per_class"][name], official["classScores"][name]
        assert (np.isnan(a) and np.isnan(b)) or abs(a - b) < 1e-6, (name, a, b)
        compared += not np.isnan(a)
    assert compared >= 1
    assert abs(ours["miou"] - official["averageScoreClasses"]) < 1e-6
    conf = np.array(official["confMatrix"], dtype=np.float64)
    evaluated = [l.id for l in LABELS if 0 <= l.train_id < 19]
    sub = conf[np.ix_(evaluated, range(conf.shape[1]))]  # rows: evaluated ground truth
    acc = np.trace(conf[np.ix_(evaluated, evaluated)]) / sub.sum()
    assert abs(ours["pixel_acc"] - acc) < 1e-6


def test_metrics_equal_official_evaluation(city_root, tmp_path):
    val = CityscapesDataset(str(city_root), "list/cityscapes/val.lst")
    rng = np.random.default_rng(0)
    conf = torch.zeros(19, 19, dtype=torch.int64)
    preds, gts = [], []
    for i in range(len(val)):
        _, label, name = val[i]
        lab = label.numpy()
        pred = np.where(lab < 19, lab, rng.integers(0, 19, lab.shape))  # right where labelled ...
        noise = rng.random(lab.shape) < 0.3
        pred = np.where(noise, rng.integers(0, 19, lab.shape), pred)  # ... but 30% random
        pred[:, :10] = 2  # a class predicted where it is absent (false positives)
        pred[pred == 17] = 13  # a class never predicted
        conf += confusion_matrix(torch.from_numpy(pred), label, 19, 255)
        path = tmp_path / f"{name}.png"
        assert cv2.imwrite(str(path), train_ids_to_label_ids(pred))
        preds.append(path)
        gts.append(Path(val.files[i]["label"]))
    ours = scores_from_confusion(conf, CLASS_NAMES)
    official = _official_eval(preds, gts)
    _assert_same_scores(ours, official)
    assert ours["iou_per_class"]["motorcycle"] == 0.0 or np.isnan(ours["iou_per_class"]["motorcycle"])


# ---------------------------------------------------------------------------------------------- end to end
TINY = SEG_TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launcher(module: str):
    return [sys.executable, "-m", module, "--nproc_per_node=2", "--master_addr=127.0.0.1",
            f"--master_port={_free_port()}"]


def _torchrun():
    return _launcher("torch.distributed.run")


@pytest.mark.slow
def test_train_ddp_then_test_matches_official(city_root, tmp_path):
    out_dir, log_dir = tmp_path / "out", tmp_path / "log"
    dirs = ["--modelDir", str(out_dir), "--logDir", str(log_dir)]
    # 8 images / (2 processes x 2) = 2 steps per epoch: epoch 0 unrolled (PRETRAIN_STEPS 2), epoch 1 equilibrium
    out = run_process(_torchrun() + ["tools/seg_train.py", "--cfg", SEG_CFG, *dirs, "DATASET.ROOT", str(city_root),
                                 *TINY, "TRAIN.END_EPOCH", "2", "TRAIN.PRETRAIN_STEPS", "2"]).all
    assert "rank 0/2" in out and "mode=unrolled" in out and "mode=equilibrium" in out
    assert "b_steps=" in out  # the implicit backward ran
    assert "validation:\nclass" in out and "global step 4" in out
    folder = out_dir / "cityscapes" / "seg_mdeq_SMALL"
    for name in ("checkpoint.pth.tar", "model_best.pth.tar", "final_state.pth", "results.json"):
        assert (folder / name).is_file(), name
    ckpt = torch.load(folder / "checkpoint.pth.tar", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["global_step"] == 4 and "optimizer" in ckpt and "scheduler" in ckpt
    assert any(log_dir.rglob("events.out.tfevents.*"))

    # resume: one more epoch from checkpoint.pth.tar, in a single process
    out = run_process([sys.executable, "tools/seg_train.py", "--cfg", SEG_CFG, *dirs, "DATASET.ROOT", str(city_root),
                   *TINY, "TRAIN.END_EPOCH", "3", "TRAIN.PRETRAIN_STEPS", "2", "TRAIN.RESUME", "True"]).all
    assert "resumed from" in out and "epoch 2, global step 4" in out and "8 steps (0 skipped)" in out
    assert torch.load(folder / "checkpoint.pth.tar", weights_only=True)["epoch"] == 3

    # evaluation of the val list: metrics, json, pictures
    out = run_process([sys.executable, "tools/seg_test.py", "--cfg", SEG_CFG, *dirs, "DATASET.ROOT", str(city_root),
                   *TINY, "--testModel", str(folder / "final_state.pth")]).all
    assert "mIoU" in out and "mean solver steps" in out
    report = json.loads((folder / "val_results.json").read_text())
    assert 0.0 <= report["miou"] <= 1.0 and 0.0 <= report["pixel_acc"] <= 1.0
    assert report["images"] == 4 and report["mean_f_steps"] > 0 and len(report["iou_per_class"]) == 19
    val = CityscapesDataset(str(city_root), "list/cityscapes/val.lst")
    colours = {tuple(c) for c in PALETTE}
    for f in val.files:
        color = cv2.imread(str(folder / "val_results" / "color" / f"{f['name']}.png"), cv2.IMREAD_COLOR)
        overlay = cv2.imread(str(folder / "val_results" / "overlay" / f"{f['name']}.png"), cv2.IMREAD_COLOR)
        assert color is not None and overlay is not None
        assert color.shape == overlay.shape == (TILE_H, TILE_W, 3)
        assert {tuple(c) for c in cv2.cvtColor(color, cv2.COLOR_BGR2RGB).reshape(-1, 3)} <= colours
        photo = cv2.imread(f["img"], cv2.IMREAD_COLOR).astype(np.int64)
        blend = (photo + color.astype(np.int64)) / 2
        assert np.abs(overlay - blend).max() <= 1  # the overlay is the input blended with the colours
    # the official evaluation on the label-id pictures gives our numbers
    preds = [folder / "val_results" / "label_ids" / f"{f['name']}.png" for f in val.files]
    official = _official_eval(preds, [f["label"] for f in val.files])
    _assert_same_scores(report, official)

    # the test list: label-id PNGs named like the inputs, in label ids (not train ids)
    run_process([sys.executable, "tools/seg_test.py", "--cfg", SEG_CFG, *dirs, "DATASET.ROOT", str(city_root), *TINY,
          "DATASET.TEST_SET", "list/cityscapes/test.lst"])
    written = sorted(p.name for p in (folder / "test_results" / "label_ids").iterdir())
    assert written == ["berlin_000000_000000_leftImg8bit.png", "berlin_000000_000001_leftImg8bit.png"]
    valid_ids = {l.id for l in LABELS if 0 <= l.train_id < 19}
    for name in written:
        ids = cv2.imread(str(folder / "test_results" / "label_ids" / name), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.shape == (TILE_H, TILE_W) and set(np.unique(ids)) <= valid_ids


@pytest.mark.slow
def test_torchrun_non_finite_loss_on_one_rank_is_skipped_by_both(city_root, tmp_path):
    """Rank 1 alone sees a NaN loss at step 3 (an equilibrium step): both ranks skip it, stay in step and
    end with identical parameters; the run finishes."""
    cmd = _torchrun() + ["tests/nan_on_one_rank.py", "seg", "--cfg", SEG_CFG, "--modelDir", str(tmp_path / "o"),
                         "--logDir", str(tmp_path / "l"), "DATASET.ROOT", str(city_root), *TINY,
                         "TRAIN.END_EPOCH", "2", "TRAIN.PRETRAIN_STEPS", "2", "DATASET.TEST_SET", ""]
    out = run_process(cmd, NAN_RANK="1", NAN_STEP="3").all
    res = json.loads((tmp_path / "o" / "cityscapes" / "seg_mdeq_SMALL" / "results.json").read_text())
    assert res["world_size"] == 2 and res["skipped_steps"] == 1 and res["global_step"] == 4
    c0, c1 = res["rank_checksums"]
    assert c0 == pytest.approx(c1, rel=1e-12, abs=1e-9), "ranks hold different weights"
    assert "step 3: non-finite loss" in out and "identical" in out


@pytest.mark.slow
def test_torch_distributed_launch(city_root, tmp_path):
    """The deprecated launcher passes --local-rank=N; two CPU processes, MAX_ITERS caps the run."""
    out = run_process(_launcher("torch.distributed.launch") + [
                   "tools/seg_train.py", "--cfg", SEG_CFG, "--modelDir", str(tmp_path / "o"), "--logDir",
                   str(tmp_path / "l"), "DATASET.ROOT", str(city_root), *TINY, "TRAIN.END_EPOCH", "5",
                   "TRAIN.MAX_ITERS", "1", "DATASET.TEST_SET", "", "TRAIN.PRETRAIN_STEPS", "0"]).all
    assert "rank 0/2" in out and "1 steps (0 skipped)" in out and "mode=equilibrium" in out
    assert (tmp_path / "o" / "cityscapes" / "seg_mdeq_SMALL" / "final_state.pth").is_file()


# ---------------------------------------------------------------------------------------------- pretrained
@pytest.mark.slow
def test_classification_checkpoint_initialises_segmentation_backbone(tmp_path, caplog):
    from mdeq.config import load_config
    from mdeq.tasks.segmentation import load_backbone
    from mdeq.models import get_seg_net
    from mdeq.utils.checkpoint import save_checkpoint

    # a classification checkpoint made by tools/cls_train.py: digits, with the segmentation net's stem and f_theta
    shape = ["MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8,16,16,16]", "MODEL.NUM_GROUPS", "4"]
    cls_opts = shape + ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", "4", "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", "[1,1,1,1]",
                        "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4,8,8,8]", "MODEL.DOWNSAMPLE_TIMES", "2",
                        "MODEL.EXPANSION_FACTOR", "5", "MODEL.WNORM", "True", "TRAIN.END_EPOCH", "1",
                        "TRAIN.MAX_ITERS", "1", "MODEL.F_THRES", "2", "MODEL.B_THRES", "2", "MODEL.NUM_LAYERS", "2",
                        "TRAIN.BATCH_SIZE_PER_GPU", "16"]
    run_process([sys.executable, "tools/cls_train.py", "--cfg", "experiments/digits/cls_mdeq_digits.yaml",
          "--modelDir", str(tmp_path / "cls_out"), "--logDir", str(tmp_path / "cls_log"), *cls_opts])
    path = tmp_path / "cls_out" / "digits" / "cls_mdeq_digits" / "checkpoint.pth.tar"
    assert path.is_file()
    cls_sd = torch.load(path, weights_only=True)["model"]
    cls_sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in cls_sd.items()}
    assert any(k.startswith("classifier.") for k in cls_sd)

    seg_cfg = load_config(REPO / SEG_CFG, shape)
    seg = get_seg_net(seg_cfg)
    with torch.no_grad():  # away from any initialisation, so that "loaded" cannot be "initialised alike"
        for p in seg.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in seg.state_dict().items()}
    with caplog.at_level("INFO"):
        report = load_backbone(seg, str(path))
    backbone = [k for k in seg.state_dict() if k.startswith(("downsample.", "stage0.", "fullstage."))]
    assert any(k.startswith("fullstage.") for k in backbone) and any(k.startswith("stage0.") for k in backbone)
    assert not [k for k in report["missing"] if k in backbone]
    for k in backbone:
        assert torch.equal(seg.state_dict()[k], cls_sd[k]), k
    # the head stays at its initialisation; the classification head is dropped and logged
    assert all(torch.equal(seg.state_dict()[k], before[k]) for k in seg.state_dict() if k.startswith("last_layer."))
    assert {k.split(".")[0] for k in report["unexpected"]} == {"incre_modules", "downsamp_modules", "final_layer",
                                                                "classifier"}
    assert "classifier" in caplog.text and "last_layer" in caplog.text

    # convert_cls_to_seg.py writes the backbone alone, which loads the same way
    out = tmp_path / "backbone.pth"
    run_process([sys.executable, "pretrained_models/convert_cls_to_seg.py", str(path), str(out), "--cfg", SEG_CFG,
                *shape])
    converted = torch.load(out, weights_only=True)
    assert sorted(converted) == sorted(backbone)
    seg2 = get_seg_net(seg_cfg)
    report2 = load_backbone(seg2, str(out))
    assert not report2["unexpected"] and all(torch.equal(seg2.state_dict()[k], cls_sd[k]) for k in backbone)

    # the original release's layout: the equilibrium stage four times, DDP-free bare state dict
    original = {}
    for k, v in cls_sd.items():
        if k.startswith("fullstage."):
            rest = k[len("fullstage."):]
            for alias in ("fullstage.", "fullstage_copy.", "deq.func.", "deq.func_copy."):
                original[alias + rest] = v
        else:
            original[k] = v
    pkl = tmp_path / "cls_mdeq_original.pkl"
    save_checkpoint(original, pkl)
    seg3 = get_seg_net(seg_cfg)
    report3 = load_backbone(seg3, str(pkl))
    assert all(torch.equal(seg3.state_dict()[k], cls_sd[k]) for k in backbone)
    assert not [k for k in report3["missing"] if k in backbone]

    # a checkpoint of another width is refused, naming what is wrong
    other = get_seg_net(load_config(REPO / SEG_CFG, ["MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[16,16,16,16]",
                                                     "MODEL.NUM_GROUPS", "4"]))
    from mdeq.utils.checkpoint import CheckpointError
    with pytest.raises(CheckpointError, match="fullstage"):
        load_backbone(other, str(out))
