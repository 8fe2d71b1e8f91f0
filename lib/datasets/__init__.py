"""Datasets: CIFAR-10, ImageNet, Fashion-MNIST and the embedded digits for classification; Cityscapes for segmentation.

:func:`build_cls_datasets` returns ``(train, val)`` for ``DATASET.DATASET`` in
``{'cifar10', 'imagenet', 'digits', 'fashion_mnist'}``; ``PERCENT`` < 1 keeps a fixed random part of the training set.
"""
from __future__ import annotations

from typing import Optional, Tuple

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


def selection_on_test_set(cfg) -> Optional[str]:
    """One line for a training run's log when the held-out set that picks ``model_best`` (the best
    epoch's weights) is a test set, whose top-1 is then no unbiased estimate: Fashion-MNIST's with
    ``DATASET.TEST_SET test``, and CIFAR-10's test batch, the only held-out set CIFAR-10 has (the
    original's CIFAR configs select on it, as this code keeps doing for them). None otherwise."""
    name = str(cfg.DATASET.DATASET).lower()
    split = str(cfg.DATASET.TEST_SET).strip()
    if name in ("fashion_mnist", "fashion-mnist", "fashionmnist") and split.lower() == "test":
        return ("model_best is chosen on DATASET.TEST_SET 'test', Fashion-MNIST's 10,000 test images, so its "
                "top-1 is not a test figure; choose on DATASET.TEST_SET val (DATASET.VAL_SIZE held-out training "
                "images) and evaluate the test set once afterwards (tools/cls_valid.py ... DATASET.TEST_SET test)")
    if name in ("cifar10", "cifar-10", "cifar"):
        return (f"model_best is chosen on CIFAR-10's test batch (DATASET.TEST_SET {split!r}: CIFAR-10 has no "
                "validation split, and the original's configs choose on it too), so its top-1 is not a test "
                "figure; the last epoch's weights (final_state.pth) are chosen by no held-out score")
    return None


def build_cls_datasets(cfg) -> Tuple[Dataset, Dataset]:
    """(train, held-out) datasets of ``cfg.DATASET.DATASET``.

    Raises:
        ValueError: an unknown dataset name or a PERCENT outside (0, 1].
        FileNotFoundError: the data folder is missing or empty (the message says how to get it).
    """
    train, val = _builder(cfg)(cfg)
    train = subset_fraction(train, float(cfg.PERCENT), seed=cfg.SEED, name="PERCENT")
    return train, val


__all__ = ["build_cls_datasets", "build_cls_val_dataset", "selection_on_test_set", "subset_fraction", "CLS_DATASETS", "DatasetError"]
