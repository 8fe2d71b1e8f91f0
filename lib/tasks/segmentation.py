"""Semantic segmentation (Cityscapes): the task the engine (:mod:`mdeq.core.trainer`) trains, its
full-resolution evaluation, and the programs ``tools/seg_train.py`` and ``tools/seg_test.py``.

* :func:`evaluate` — confusion matrix summed over the ranks, per-class IoU, mIoU, pixel accuracy
  (conventions of the official Cityscapes evaluation, see :mod:`mdeq.core.seg_metrics`) and the
  mean number of forward solver steps; optional flip and multi-scale testing; an optional callback
  receives every prediction (to write pictures).
* Training writes the files of :mod:`mdeq.core.checkpoint_manager` to
  ``OUTPUT_DIR/cityscapes/<cfg stem>/``; the best metric is the validation mIoU.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..datasets.cityscapes import (CLASS_NAMES, CityscapesDataset, colorize, require_cityscapes,
                                  train_ids_to_label_ids)
from ..datasets.common import ignore_label
from ..models import BACKBONE_PREFIXES, count_parameters, get_seg_net
from ..modules import EquilibriumInfo
from ..utils.checkpoint import load_pretrained, load_weights
from ..utils.distributed import DistInfo, all_reduce_sum, process_group_closed, unwrap
from ..utils.logger import progress_bar
from ..core.checkpoint_manager import model_files
from ..core.criterion import build_criterion, resize_logits
from ..programs.launch import base_parser, config_from_args, setup_process
from ..programs.launch import parse_args as parse_launch_args
from ..core.seg_metrics import confusion_matrix, scores_from_confusion
from ..core.state import make_loader
from ..programs.sweep import add_sweep_option, sweep_checkpoints
from ..core.trainer import STOPPED_TOGETHER, Task, autocast_dtype, fit

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: nn.Module, images: Tensor, size: Sequence[int], scales: Sequence[float] = (1.0,),
            flip: bool = False, **model_kwargs: Any) -> Tuple[Tensor, EquilibriumInfo]:
    """(class probabilities (N, C, H, W) at ``size`` (H, W), averaged over the ``scales`` (the image
    resized bilinearly) and, with ``flip``, the horizontally flipped image; the equilibrium info
    of the last forward). ``model_kwargs`` go to every model call (``f_thres=...``)."""
    probs = None
    h, w = images.shape[-2:]
    views = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, size=(max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))),
                                                    mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            logits, info = model(x.flip(-1) if flipped else x, return_info=True, **model_kwargs)
            if flipped:
                logits = logits.flip(-1)
            p = F.softmax(resize_logits(logits.float(), size), dim=1)
            probs = p if probs is None else probs + p
            views += 1
    return probs / views, info


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, num_classes: int, device: torch.device, ignore: int = 255,
             scales: Sequence[float] = (1.0,), flip: bool = False, is_main: bool = True,
             class_names: Optional[Sequence[str]] = None,
             on_prediction: Optional[Callable[[np.ndarray, str], None]] = None, amp: bool = False,
             **model_kwargs: Any) -> Dict[str, Any]:
    """Evaluate on ``loader`` (image, label, name batches; labels at full resolution).

    Returns the scores of :func:`mdeq.core.seg_metrics.scores_from_confusion` plus ``confusion``
    (list of lists), ``mean_f_steps`` and ``mean_f_rel`` (forward solver steps and final relative
    residual per image, over the images of every rank) and ``images``. ``on_prediction(pred, name)``
    gets each predicted train-id map (H, W) uint8 on the rank that computed it; ``amp`` (TRAIN.AMP)
    runs the model under the training's autocast dtype (:func:`~mdeq.core.trainer.autocast_dtype`);
    ``model_kwargs`` go to the model calls.
    """
    net = unwrap(model)
    net.eval()
    amp_dtype = autocast_dtype(amp, device)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    # sums of f_steps * images, f_rel * images, those images, all images
    steps = torch.zeros(4, dtype=torch.float64, device=device)
    for images, labels, names in progress_bar(loader, enabled=is_main, desc="eval"):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs, info = predict(net, images, labels.shape[-2:], scales, flip, **model_kwargs)
            pred = probs.argmax(dim=1)
        conf += confusion_matrix(pred, labels, num_classes, ignore)
        f_steps, f_rel = info.f_steps, info.f_rel
        if f_steps is not None:
            steps[:3] += torch.tensor([f_steps, f_rel if f_rel is not None else math.nan, 1.0],
                                      dtype=torch.float64, device=device) * images.shape[0]
        steps[3] += images.shape[0]
        if on_prediction is not None:
            for p, name in zip(pred.to(torch.uint8).cpu().numpy(), names):
                on_prediction(p, name)
    conf, steps = all_reduce_sum(conf), all_reduce_sum(steps)
    scores = scores_from_confusion(conf, class_names)
    scores["confusion"] = conf.cpu().tolist()
    scores["mean_f_steps"] = float(steps[0] / steps[2]) if steps[2] > 0 else float("nan")
    scores["mean_f_rel"] = float(steps[1] / steps[2]) if steps[2] > 0 else float("nan")
    scores["images"] = int(steps[3])
    return scores


def format_scores(scores: Dict[str, Any]) -> str:
    """A readable table of per-class IoU and the summary numbers."""
    lines = [f"{'class':<16} IoU"]
    for name, v in scores["iou_per_class"].items():
        lines.append(f"{name:<16} {'  n/a' if math.isnan(v) else f'{v:.4f}'}")
    lines.append(f"mIoU {scores['miou']:.4f}  pixel acc {scores['pixel_acc']:.4f}  "
                 f"mean class acc {scores['mean_class_acc']:.4f}  mean solver steps {scores['mean_f_steps']:.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the task
def load_backbone(model: nn.Module, path: str) -> Dict[str, List[str]]:
    """Initialise the stem and f_theta from a classification checkpoint (ours or the original's
    ``.pkl``): the classification head is dropped, the segmentation head keeps its initialisation,
    and the modules not found on either side are logged. A missing stem or f_theta weight is an error."""
    logger.info("MODEL.PRETRAINED: loading the backbone of %s", path)
    report = load_pretrained(model, path, required_prefixes=BACKBONE_PREFIXES)
    if report["shape"]:
        logger.warning("shape mismatches, kept at initialisation: %s", report["shape"])
    return report


class SegmentationTask(Task):
    """Per-pixel cross-entropy (or OHEM) on Cityscapes train ids; validation mIoU."""

    name = "segmentation"
    best_metric = "miou"
    drop_last = True   # batch norm in the head needs more than one image

    def build_model(self, cfg, initial_weights: bool) -> nn.Module:
        model = get_seg_net(cfg)
        logger.info("segmentation MDEQ: %s trainable parameters", f"{count_parameters(model):,}")
        if initial_weights and cfg.MODEL.PRETRAINED:
            load_backbone(model, cfg.MODEL.PRETRAINED)
        if initial_weights and cfg.TRAIN.MODEL_FILE:
            logger.info("TRAIN.MODEL_FILE: loading every weight of %s", cfg.TRAIN.MODEL_FILE)
            load_weights(model, cfg.TRAIN.MODEL_FILE, strict=True)
        return model

    def build_datasets(self, cfg) -> Tuple[Dataset, Optional[Dataset]]:
        val = CityscapesDataset.from_config(cfg, "val") if cfg.DATASET.TEST_SET else None
        return CityscapesDataset.from_config(cfg, "train"), val

    def build_criterion(self, cfg) -> nn.Module:
        return build_criterion(cfg)

    def prepare_distributed(self, model: nn.Module, info: DistInfo) -> nn.Module:
        if info.device.type == "cuda":
            logger.info("batch norm: SyncBatchNorm over %d processes", info.world_size)
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        logger.info("batch norm: SyncBatchNorm needs CUDA; each of the %d CPU processes keeps its own "
                    "BatchNorm2d statistics (rank 0's are broadcast every step)", info.world_size)
        return model

    def evaluate(self, model: nn.Module, loader: DataLoader, cfg, info: DistInfo) -> Dict[str, Any]:
        return evaluate(model, loader, cfg.DATASET.NUM_CLASSES, info.device, ignore_label(cfg),
                        is_main=info.is_main, class_names=CLASS_NAMES, amp=bool(cfg.TRAIN.AMP))

    def describe(self, result: Dict[str, Any]) -> str:
        return "validation:\n" + format_scores(result)

    def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
        return {k: float(result[k]) for k in ("miou", "pixel_acc", "mean_class_acc", "mean_f_steps") if k in result}


# ---------------------------------------------------------------------------------------------- programs
def parse_seg_args(description: str, test: bool = False, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The shared options (:func:`mdeq.programs.launch.base_parser`); seg_test adds ``--no-pictures``."""
    p = base_parser(description)
    if test:
        p.add_argument("--no-pictures", dest="pictures", action="store_false",
                       help="do not write prediction pictures of a labelled list")
        add_sweep_option(p)
    args = parse_launch_args(p, argv)
    if not test:
        args.pictures, args.f_thres_sweep = False, ""
    return args


def train_main(args: argparse.Namespace) -> Dict[str, Any]:
    """``tools/seg_train.py``."""
    cfg = config_from_args(args)
    require_cityscapes(cfg)
    info, out_dir, tb_dir = setup_process(cfg, args.cfg, "train", args.local_rank)
    with process_group_closed(together=STOPPED_TOGETHER):
        return fit(SegmentationTask(), cfg, info, out_dir, tb_dir)


def _write_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}")


def test_main(args: argparse.Namespace) -> Dict[str, Any]:
    """``tools/seg_test.py``."""
    cfg = config_from_args(args)
    require_cityscapes(cfg)
    info, out_dir, _ = setup_process(cfg, args.cfg, "test", args.local_rank)
    with process_group_closed():
        if args.f_thres_sweep:
            return _sweep(cfg, info, out_dir, args.f_thres_sweep)
        return _test(cfg, info, out_dir, pictures=args.pictures)


def _test(cfg, info: DistInfo, out_dir: str, pictures: bool = True) -> Dict[str, Any]:
    [model_file] = model_files(cfg, out_dir)
    model = SegmentationTask().build_model(cfg, initial_weights=False)
    load_weights(model, model_file, strict=True)
    model.to(info.device)
    logger.info("evaluating %s", model_file)
    dataset = CityscapesDataset.from_config(cfg, "test")
    list_name = os.path.splitext(os.path.basename(cfg.DATASET.TEST_SET))[0]
    pic_dir = os.path.join(out_dir, f"{list_name}_results")
    by_name = {f["name"]: i for i, f in enumerate(dataset.files)}
    scales = list(cfg.TEST.SCALE_LIST) if cfg.TEST.MULTI_SCALE else [1.0]

    def write(pred: np.ndarray, name: str) -> None:
        # label ids: the benchmark's format and name (same base name as the input image)
        _write_png(os.path.join(pic_dir, "label_ids", f"{name}.png"), train_ids_to_label_ids(pred))
        if dataset.labeled and not pictures:
            return
        color = colorize(pred)
        _write_png(os.path.join(pic_dir, "color", f"{name}.png"), color)
        if dataset.labeled:
            image = dataset.load_image(by_name[name])
            _write_png(os.path.join(pic_dir, "overlay", f"{name}.png"), cv2.addWeighted(image, 0.5, color, 0.5, 0.0))

    scores = evaluate(model, make_loader(dataset, cfg, info, train=False), cfg.DATASET.NUM_CLASSES, info.device,
                      ignore_label(cfg), scales=scales, flip=cfg.TEST.FLIP_TEST, is_main=info.is_main,
                      class_names=CLASS_NAMES, on_prediction=write, amp=bool(cfg.TRAIN.AMP))
    if not dataset.labeled:
        logger.info("%d predictions (label ids, benchmark format) written to %s; mean solver steps %.2f",
                    scores["images"], os.path.join(pic_dir, "label_ids"), scores["mean_f_steps"])
        return {"images": scores["images"], "mean_f_steps": scores["mean_f_steps"], "output": pic_dir}
    logger.info("%s (%d images, scales %s, flip %s):\n%s", cfg.DATASET.TEST_SET, scores["images"], scales,
                cfg.TEST.FLIP_TEST, format_scores(scores))
    if info.is_main:
        report = {k: scores[k] for k in ("miou", "pixel_acc", "mean_class_acc", "mean_f_steps", "iou_per_class",
                                         "images", "pixels", "confusion")}
        report.update(model_file=model_file, list=cfg.DATASET.TEST_SET, scales=scales, flip=cfg.TEST.FLIP_TEST)
        json_path = os.path.join(out_dir, f"{list_name}_results.json")
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2, allow_nan=True)
        logger.info("results written to %s, pictures to %s", json_path, pic_dir)
    return scores


def _sweep(cfg, info: DistInfo, out_dir: str, budgets: str) -> Dict[str, Any]:
    """``seg_test.py --f-thres-sweep``: mIoU (%), mean relative residual and forward steps of each
    checkpoint at each forward budget (no pictures)."""
    model = SegmentationTask().build_model(cfg, initial_weights=False).to(info.device)
    loader = make_loader(CityscapesDataset.from_config(cfg, "test"), cfg, info, train=False)
    scales = list(cfg.TEST.SCALE_LIST) if cfg.TEST.MULTI_SCALE else [1.0]

    def run(f_thres: int) -> Dict[str, float]:
        s = evaluate(model, loader, cfg.DATASET.NUM_CLASSES, info.device, ignore_label(cfg), scales=scales,
                     flip=cfg.TEST.FLIP_TEST, is_main=info.is_main, class_names=CLASS_NAMES, f_thres=f_thres,
                     amp=bool(cfg.TRAIN.AMP))
        return {"miou": 100.0 * s["miou"], "f_steps": s["mean_f_steps"], "f_rel": s["mean_f_rel"]}

    return sweep_checkpoints(cfg, out_dir, budgets, lambda p: load_weights(model, p, strict=True), "miou",
                             "mIoU (%)", run, info.is_main)
