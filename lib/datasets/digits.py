"""The embedded offline dataset: scikit-learn's 1,797 handwritten digits (8x8, 10 classes).

The images ship inside scikit-learn (no download). They are resized bilinearly to 32x32, repeated
to 3 channels and normalised as (x / 16 - 0.3) / 0.4 (the preprocessing of the reference
recordings). A fixed seeded permutation splits them into 1,497 training and 300 held-out images.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_HELD_OUT = 300
SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """The 1,797 images (N, 8, 8) float64, values 0..16, and labels (N,) from scikit-learn's
    ``datasets/data/digits.csv.gz`` (64 pixel columns and the label per row, what its ``load_digits``
    reads). The file is found without importing scikit-learn, whose import takes most of a second
    of every digits run."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ImportError("DATASET.DATASET 'digits' needs scikit-learn (pip install scikit-learn): "
                          "its handwritten digits ship inside it")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"scikit-learn's digits file is missing: {path}")
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def digits_tensors(size: int = 32) -> Tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 images (N, 3, size, size) float32, normalised, and labels (N,) int64."""
    images, labels = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8), values 0..16
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x / 16.0 - 0.3) / 0.4).repeat(1, 3, 1, 1).contiguous()
    return x, torch.tensor(labels)


class DigitsDataset(Dataset):
    """One split of the digits; ``augment`` shifts each image by up to ``shift`` pixels (zero-padded)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False, shift: int = 2) -> None:
        self.images, self.labels = images, labels
        self.augment, self.shift = augment, shift
        self.classes = [str(i) for i in range(10)]
        self.background = float((0.0 - 0.3) / 0.4)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = self.images[index]
        if self.augment and self.shift > 0:
            s = self.shift
            padded = F.pad(x, (s, s, s, s), value=self.background)
            i, j = torch.randint(0, 2 * s + 1, (2,)).tolist()
            x = padded[:, i:i + x.shape[1], j:j + x.shape[2]]
        return x, int(self.labels[index])


def build_digits(cfg, with_train: bool = True) -> Tuple[Optional[Dataset], Dataset]:
    """(train 1,497, held-out 300) digits; ``DATASET.AUGMENT`` turns on random shifts of <= 2 pixels."""
    size = int(cfg.MODEL.IMAGE_SIZE[0]) if cfg.MODEL.IMAGE_SIZE else 32
    x, y = digits_tensors(size)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(SPLIT_SEED))
    train_idx, val_idx = perm[:-NUM_HELD_OUT], perm[-NUM_HELD_OUT:]
    train = DigitsDataset(x[train_idx], y[train_idx], augment=cfg.DATASET.AUGMENT) if with_train else None
    return train, DigitsDataset(x[val_idx], y[val_idx], augment=False)
