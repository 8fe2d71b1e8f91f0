"""Top-k accuracy for classification."""
from __future__ import annotations

from typing import List, Sequence

import torch


@torch.no_grad()
def topk_correct(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> List[int]:
    """Number of samples whose target is among the k highest logits, for each k (k capped at the class count)."""
    if logits.ndim != 2 or target.ndim != 1 or logits.shape[0] != target.shape[0]:
        raise ValueError(f"expected logits (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    maxk = min(max(topk), logits.shape[1])
    pred = logits.topk(maxk, dim=1).indices  # (N, maxk)
    hit = pred.eq(target.view(-1, 1))
    return [int(hit[:, :min(k, maxk)].any(dim=1).sum().item()) for k in topk]


@torch.no_grad()
def accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> List[float]:
    """Top-k accuracy in percent for each k."""
    n = max(1, target.shape[0])
    return [100.0 * c / n for c in topk_correct(logits, target, topk)]
