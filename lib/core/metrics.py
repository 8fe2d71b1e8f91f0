"""Top-k accuracy for classification; statistics of per-image counts kept as a histogram."""
from __future__ import annotations

from typing import Dict, List, Sequence

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


def count_histogram(counts: torch.Tensor, bins: int) -> torch.Tensor:
    """(bins,) int64: how many of the (N,) whole-number ``counts`` are 0, 1, ..., ``bins - 1`` (larger
    ones in the last bin). A histogram of a fixed size sums exactly across batches and processes."""
    return torch.bincount(counts.detach().long().clamp(0, bins - 1).reshape(-1).cpu(), minlength=bins)


def histogram_stats(hist: torch.Tensor, quantile: float = 0.9) -> Dict[str, float]:
    """``{'mean': ..., 'quantile': ...}`` of the counts in ``hist`` (see :func:`count_histogram`); the
    quantile is the nearest-rank one (the smallest count that at least ``quantile`` of them do not
    exceed). NaN for an empty histogram."""
    hist = hist.double()
    total = float(hist.sum())
    if total == 0:
        return {"mean": float("nan"), "quantile": float("nan")}
    values = torch.arange(hist.numel(), dtype=torch.float64)
    rank = int(torch.searchsorted(hist.cumsum(0), torch.tensor(quantile * total, dtype=torch.float64) - 1e-9))
    return {"mean": float((hist * values).sum()) / total, "quantile": float(rank)}
