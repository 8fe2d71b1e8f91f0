"""Helpers shared by the datasets, classification and segmentation: subsets, label and folder checks,
where a split lies (:func:`split_path`), the ignore label."""
from __future__ import annotations

import logging
import os
from typing import Sequence

import torch
from torch.utils.data import Dataset, Subset

logger = logging.getLogger(__name__)


class DatasetError(RuntimeError):
    """Data that cannot be used (an unreadable, truncated or tampered file, an image without its
    label, an empty list); the message names the file and what to do."""


def subset_fraction(ds: Dataset, percent: float, seed: int = 0, name: str = "PERCENT") -> Dataset:
    """A fixed random ``percent`` of ``ds`` (``percent`` in (0, 1]; 1 returns ``ds`` unchanged).

    The subset depends only on ``seed`` and ``len(ds)``, so every process and every restart of a
    run sees the same samples.
    """
    if not 0.0 < percent <= 1.0:
        from ..config.loader import ConfigError
        raise ConfigError(f"{name} = {percent} must lie in (0, 1]")
    if percent >= 1.0:
        return ds
    n = len(ds)  # type: ignore[arg-type]
    k = max(1, int(round(n * percent)))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:k].sort().values.tolist()
    logger.info("using %d of %d training samples (%s = %g)", k, n, name, percent)
    return Subset(ds, idx)


def check_labels(labels: Sequence[int], num_classes: int, source: str) -> None:
    """Raise DatasetError naming ``source``, the first label outside ``0..num_classes-1`` and its
    index: read when the dataset is built, such a label would otherwise stop training or evaluation
    at the batch that holds it, minutes or hours in."""
    for i, v in enumerate(labels):
        if not 0 <= v < num_classes:
            raise DatasetError(f"{source}: label {v} (sample {i}) is outside the {num_classes} classes "
                               f"0..{num_classes - 1}; the file is corrupt or of another dataset")


def require_dir(path: str, what: str, hint: str) -> None:
    """Raise FileNotFoundError naming ``path`` and how to get the data when it is not a folder."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: folder {os.path.abspath(path)} does not exist. {hint}")


def require_files(folder: str, names: Sequence[str], what: str, hint: str) -> None:
    """Raise FileNotFoundError listing the files of ``names`` that are missing in ``folder``."""
    missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
    if missing:
        raise FileNotFoundError(f"{what}: {os.path.abspath(folder)} lacks {', '.join(missing)}. {hint}")


def ignore_label(cfg) -> int:
    """The label of pixels that carry no loss and no score: ``TRAIN.IGNORE_LABEL``, 255 when negative."""
    return int(cfg.TRAIN.IGNORE_LABEL) if cfg.TRAIN.IGNORE_LABEL >= 0 else 255


def split_path(name: str, pattern: str) -> str:
    """Where the split ``name`` (``DATASET.TRAIN_SET`` / ``TEST_SET``) lies, relative to ``DATASET.ROOT``.

    Both keys name a split (``'train'``, ``'val'``, ``'test'``; ``'valid'`` is ``'val'``) for every
    dataset, and each dataset says by ``pattern`` where its splits are stored (ImageNet ``'{}'``: a
    class-folder tree, Cityscapes ``'list/cityscapes/{}.lst'``: a list file). A value with a ``/`` or a
    file suffix is a path already (the original's Cityscapes files, ``'list/cityscapes/val.lst'``, or
    a list of one's own) and is returned as it is.
    """
    name = str(name)
    if "/" in name or os.path.splitext(name)[1]:
        return name
    return pattern.format("val" if name == "valid" else name)
