"""Datasets: CIFAR-10, ImageNet, Fashion-MNIST and the embedded digits for classification; Cityscapes for segmentation.

:func:`build_cls_datasets` returns ``(train, val)`` for ``DATASET.DATASET`` in
``{'cifar10', 'imagenet', 'digits', 'fashion_mnist'}``; ``PERCENT`` < 1 keeps a fixed random part of the training set.
"""
from __future__ import annotations

from typing import Tuple

from torch.utils.data import Dataset

from ..config.loader import ConfigError
from .common import DatasetError, subset_fraction

CLS_DATASETS = ("cifar10", "imagenet", "digits", "fashion_mnist")


def _builder(cfg):
    name = str(cfg.DATASET.DATASET).lower()
    if name in ("cifar10", "cifar-10", "cifar"):
        from .cifar import build_cifar10 as build
    elif name == "imagenet":
        from .imagenet import build_imagenet as build
    elif name == "digits":
        from .digits import build_digits as build
    elif name in ("fashion_mnist", "fashion-mnist", "fashionmnist"):
        from .fashion_mnist import build_fashion_mnist as build
    else:
        raise ConfigError(f"DATASET.DATASET = {cfg.DATASET.DATASET!r}: classification supports {CLS_DATASETS}")
    return build


def build_cls_val_dataset(cfg) -> Dataset:
    """Only the held-out set of ``cfg.DATASET.DATASET`` (for evaluation scripts)."""
    return _builder(cfg)(cfg, with_train=False)[1]


def build_cls_datasets(cfg) -> Tuple[Dataset, Dataset]:
    """(train, held-out) datasets of ``cfg.DATASET.DATASET``.

    Raises:
        ValueError: an unknown dataset name or a PERCENT outside (0, 1].
        FileNotFoundError: the data folder is missing or empty (the message says how to get it).
    """
    train, val = _builder(cfg)(cfg)
    train = subset_fraction(train, float(cfg.PERCENT), seed=cfg.SEED, name="PERCENT")
    return train, val


__all__ = ["build_cls_datasets", "build_cls_val_dataset", "subset_fraction", "CLS_DATASETS", "DatasetError"]
