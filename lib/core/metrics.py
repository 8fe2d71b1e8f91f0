"""Running averages and top-k accuracy for classification."""
from __future__ import annotations

from typing import List, Sequence

import torch


class AverageMeter:
    """Keeps the last value, the running sum, count and average of a quantity."""

    def __init__(self, name: str = "", fmt: str = ":.4f") -> None:
        self.name, self.fmt = name, fmt
        self.reset()

    def reset(self) -> None:
        self.val = 0.0
        self.sum = 0.0
        self.count = 0
        self.avg = 0.0

    def update(self, val: float, n: int = 1) -> None:
        """Add ``val`` (the mean over ``n`` samples)."""
        self.val = float(val)
        self.sum += float(val) * n
        self.count += n
        self.avg = self.sum / self.count if self.count else 0.0


    def __str__(self) -> str:
        return ("{name} {val" + self.fmt + "} ({avg" + self.fmt + "})").format(**self.__dict__)


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
