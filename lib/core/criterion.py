"""Segmentation losses: cross-entropy with an ignore label, and online hard example mining (OHEM).

Both take logits (N, C, h, w) at any resolution and labels (N, H, W); logits of another size are
upsampled bilinearly (``align_corners=False``, as the evaluation's rescaling in
:mod:`mdeq.tasks.segmentation` does; only the model's head, :class:`~mdeq.models.seg_net.MDEQSegNet`,
upsamples its lower-resolution streams with ``align_corners=True``) to the label size first. A
batch in which every pixel is ignored gives a zero loss (still connected to the graph), not NaN.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..datasets.common import ignore_label

Tensor = torch.Tensor


def resize_logits(logits: Tensor, size) -> Tensor:
    """Bilinear upsampling of (N, C, h, w) logits to ``size`` (H, W); identity if already there."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


class CrossEntropy(nn.Module):
    """Mean cross-entropy over the pixels whose label is not ``ignore_label``."""

    def __init__(self, ignore_label: int = 255, weight: Tensor | None = None) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.register_buffer("weight", weight if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = resize_logits(logits, target.shape[-2:])
        if not (target != self.ignore_label).any():
            return logits.sum() * 0.0
        return F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_label)


class OhemCrossEntropy(nn.Module):
    """Cross-entropy over the hard pixels only (HRNet's OHEM).

    Among the non-ignored pixels of the batch, the kept ones are those whose predicted probability
    of their true class is below ``max(thres, p_k)``, where ``p_k`` is the ``min_kept``-th smallest
    such probability: every pixel under ``thres``, and at least ``min_kept`` pixels (or all of them
    if there are fewer).
    """

    def __init__(self, ignore_label: int = 255, thres: float = 0.7, min_kept: int = 100000,
                 weight: Tensor | None = None) -> None:
        super().__init__()
        self.ignore_label = ignore_label
        self.thres = float(thres)
        self.min_kept = max(1, int(min_kept))
        self.register_buffer("weight", weight if weight is None else torch.as_tensor(weight, dtype=torch.float32))

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = resize_logits(logits, target.shape[-2:])
        valid = target != self.ignore_label
        n_valid = int(valid.sum())
        if n_valid == 0:
            return logits.sum() * 0.0
        pixel_loss = F.cross_entropy(logits, target, weight=self.weight, ignore_index=self.ignore_label,
                                     reduction="none")[valid]
        with torch.no_grad():
            prob = F.softmax(logits.float(), dim=1)
            safe_target = target.masked_fill(~valid, 0)
            true_prob = prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)[valid]
            k = min(self.min_kept, n_valid) - 1
            kth = torch.kthvalue(true_prob, k + 1).values if k >= 0 else true_prob.min()
            threshold = torch.clamp(kth, min=self.thres)
            keep = true_prob <= threshold if kth >= self.thres else true_prob < threshold
        return pixel_loss[keep].mean()


def build_criterion(cfg) -> nn.Module:
    """``LOSS.USE_OHEM`` -> :class:`OhemCrossEntropy` (``OHEMTHRES``, ``OHEMKEEP``), else :class:`CrossEntropy`;
    the ignore label is ``TRAIN.IGNORE_LABEL`` (255 if negative)."""
    ignore = ignore_label(cfg)
    if cfg.LOSS.USE_OHEM:
        return OhemCrossEntropy(ignore, cfg.LOSS.OHEMTHRES, cfg.LOSS.OHEMKEEP)
    return CrossEntropy(ignore)
