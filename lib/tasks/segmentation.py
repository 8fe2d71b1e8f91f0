"""Semantic segmentation (Cityscapes): the task the engine (:mod:`mdeq.core.trainer`) trains and its
full-resolution evaluation (the programs: :mod:`mdeq.programs.segmentation`).

* :func:`evaluate` — confusion matrix summed over the ranks, per-class IoU, mIoU, pixel accuracy
  (conventions of the official Cityscapes evaluation, see :mod:`mdeq.core.seg_metrics`) and the
  mean number of forward solver steps; optional flip and multi-scale testing; an optional callback
  receives every prediction (to write pictures).
* Training writes the files of :mod:`mdeq.core.checkpoint_manager` to
  ``OUTPUT_DIR/cityscapes/<cfg stem>/``; the best metric is the validation mIoU.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..datasets.cityscapes import CLASS_NAMES, CityscapesDataset
from ..datasets.common import ignore_label
from ..models import BACKBONE_PREFIXES, count_parameters, get_seg_net
from ..modules import EquilibriumInfo
from ..utils.checkpoint import load_pretrained, load_weights
from ..utils.distributed import DistInfo, unwrap
from ..utils.logger import progress_bar
from ..core.criterion import build_criterion, resize_logits
from ..core.reduce import Reducer
from ..core.seg_metrics import confusion_matrix, scores_from_confusion
from ..core.trainer import Task
from ..utils.precision import autocast_dtype

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
    runs the model under the training's autocast dtype (:func:`~mdeq.utils.precision.autocast_dtype`);
    ``model_kwargs`` go to the model calls.
    """
    net = unwrap(model)
    net.eval()
    amp_dtype = autocast_dtype(amp, device)
    # the confusion matrix and the images; the solver statistics, means over the images that reported them
    reducer = Reducer(sums=("images",), means=("f_steps", "f_rel"))
    reducer.add({"confusion": torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)})
    for images, labels, names in progress_bar(loader, enabled=is_main, desc="eval"):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs, info = predict(net, images, labels.shape[-2:], scales, flip, **model_kwargs)
            pred = probs.argmax(dim=1)
        stats = {k: info.get(k) for k in ("f_steps", "f_rel")}
        reducer.add({"confusion": confusion_matrix(pred, labels, num_classes, ignore), "images": images.shape[0]},
                    stats, weight=images.shape[0])
        if on_prediction is not None:
            for p, name in zip(pred.to(torch.uint8).cpu().numpy(), names):
                on_prediction(p, name)
    tot = reducer.reduce(device)
    conf = tot.sums["confusion"]
    scores = scores_from_confusion(conf, class_names)
    scores["confusion"] = conf.tolist()
    scores["mean_f_steps"] = tot.means.get("f_steps", float("nan"))
    scores["mean_f_rel"] = tot.means.get("f_rel", float("nan"))
    scores["images"] = int(tot.sums["images"])
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
        return evaluate(model, loader, cfg.MODEL.NUM_CLASSES, info.device, ignore_label(cfg),
                        is_main=info.is_main, class_names=CLASS_NAMES, amp=bool(cfg.TRAIN.AMP))

    def describe(self, result: Dict[str, Any]) -> str:
        return "validation:\n" + format_scores(result)

    def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
        return {k: float(result[k]) for k in ("miou", "pixel_acc", "mean_class_acc", "mean_f_steps") if k in result}
