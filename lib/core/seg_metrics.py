"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU, pixel accuracy.

The conventions are those of the official Cityscapes evaluation (cityscapesScripts,
``evalPixelLevelSemanticLabeling``): pixels whose ground truth is ignored are not counted at all
(neither as false positives nor as false negatives); a class that appears neither in the ground
truth nor in the predictions has an undefined IoU (NaN) and is left out of the mean.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

Tensor = torch.Tensor


def confusion_matrix(pred: Tensor, label: Tensor, num_classes: int, ignore_label: int = 255) -> Tensor:
    """(C, C) int64 counts, rows = ground truth, columns = prediction, over non-ignored pixels.

    ``pred`` and ``label`` are integer tensors of the same shape; a prediction outside
    0..C-1 is counted in no column (it is a false negative of its ground-truth class).
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(label.shape)}")
    label = label.reshape(-1).long()
    pred = pred.reshape(-1).long()
    valid = (label != ignore_label) & (label >= 0) & (label < num_classes)
    label, pred = label[valid], pred[valid]
    in_range = (pred >= 0) & (pred < num_classes)
    # out-of-range predictions go to an extra column that is dropped
    pred = torch.where(in_range, pred, torch.full_like(pred, num_classes))
    counts = torch.bincount(label * (num_classes + 1) + pred, minlength=num_classes * (num_classes + 1))
    return counts.reshape(num_classes, num_classes + 1)[:, :num_classes]


def scores_from_confusion(conf, class_names: Optional[Sequence[str]] = None) -> Dict:
    """Per-class IoU (NaN where undefined), mIoU (mean of the defined ones), pixel accuracy,
    mean class accuracy, from a (C, C) confusion matrix (tensor or array)."""
    conf = np.asarray(conf.cpu() if isinstance(conf, Tensor) else conf, dtype=np.float64)
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    denom = gt + predicted - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
        class_acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
    total = conf.sum()
    defined = ~np.isnan(iou)
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]
    return {
        "iou": iou.tolist(),
        "iou_per_class": {n: float(v) for n, v in zip(names, iou)},
        "miou": float(iou[defined].mean()) if defined.any() else float("nan"),
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_acc": float(np.nanmean(class_acc)) if (~np.isnan(class_acc)).any() else float("nan"),
        "pixels": int(total),
    }
