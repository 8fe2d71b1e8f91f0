"""Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 70,000 28x28 grey photos of clothing, 10 classes.

Read from the four standard IDX files in ``DATASET.ROOT`` (default: Debian's package
``dataset-fashion-mnist``, ``/usr/share/datasets/fashion-mnist``), gzipped or not, directly in the
folder or in torchvision's ``FashionMNIST/raw`` layout below it. The IDX format: a big-endian
header (two zero bytes, the element type 0x08 = unsigned byte, the number of dimensions), one
big-endian uint32 per dimension, then the bytes; images are ``0x00000803`` (N, 28, 28), labels
``0x00000801`` (N,).

Splits (``DATASET.TEST_SET``): ``'val'`` (or ``'valid'``) is a validation split of
``DATASET.VAL_SIZE`` images carved from the 60,000 training images by a fixed seeded permutation
(training then uses the rest) and is what settings are chosen on; ``'test'`` is the 10,000 test
images, reported and never tuned on; ``''`` (empty) trains without a held-out set (no evaluation
during training: the final run of a recipe chosen on ``'val'``, on all the training images with
``VAL_SIZE 0``, its test set evaluated once afterwards by ``tools/cls_valid.py ... DATASET.TEST_SET
test``). Images have one channel (``MODEL.IN_CHANNELS 1``), normalised with the training set's mean
and std; ``DATASET.AUGMENT`` adds a random crop (zero-padded by 2) and a horizontal flip;
``DATASET.RANDOM_ERASING`` > 0 erases a random rectangle of a training image with that probability.
"""
from __future__ import annotations

import gzip
import os
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import RandomErasing

from ..config.loader import ConfigError
from .common import DatasetError, split_path

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
INSTALL = "apt-get install dataset-fashion-mnist (puts the files in /usr/share/datasets/fashion-mnist)"
FILES: Dict[str, Tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
MEAN, STD = 0.2860, 0.3530   # of the 60,000 training images, pixels scaled to [0, 1]
SPLIT_SEED = 0               # the validation split's permutation; fixed, so every run holds out the same images
PAD = 2                      # the random crop's zero padding, in pixels
_IMAGES_MAGIC, _LABELS_MAGIC = 0x00000803, 0x00000801


def find_file(root: str, stem: str) -> str:
    """The path of ``stem`` (or ``stem.gz``) in ``root`` or ``root/FashionMNIST/raw``.

    Raises:
        FileNotFoundError: none of the places has it (the message lists them and the install command).
    """
    folders = [root, os.path.join(root, "FashionMNIST", "raw")]
    for folder in folders:
        for name in (stem + ".gz", stem):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                return path
    raise FileNotFoundError(f"Fashion-MNIST: {stem}[.gz] is in neither {os.path.abspath(folders[0])} nor "
                            f"{os.path.abspath(folders[1])}. Install it: {INSTALL}; or set DATASET.ROOT to the "
                            f"folder that holds the four IDX files")


def read_idx(path: str, magic: int) -> np.ndarray:
    """The array of the IDX file ``path`` (gzip-compressed when it ends in ``.gz``), uint8.

    Raises:
        DatasetError: the file cannot be read, its magic number is not ``magic``, or it holds fewer or
            more bytes than its header says.
    """
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:   # gzip raises these on a truncated or corrupt stream
        raise DatasetError(f"Fashion-MNIST: cannot read {path}: {e} (truncated? reinstall: {INSTALL})") from e
    if len(raw) < 4 or int.from_bytes(raw[:4], "big") != magic:
        found = f"0x{int.from_bytes(raw[:4], 'big'):08x}" if len(raw) >= 4 else f"only {len(raw)} bytes"
        raise DatasetError(f"Fashion-MNIST: {path} is not an IDX file of this kind: magic number {found}, "
                           f"expected 0x{magic:08x}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DatasetError(f"Fashion-MNIST: {path} holds {len(raw)} bytes, its header {dims} says {expected} "
                           f"(truncated? reinstall: {INSTALL})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_split(root: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of ``split`` ('train' or 'test'), checked.

    Raises:
        FileNotFoundError: a file is missing. DatasetError: a file is wrong (named).
    """
    image_stem, label_stem = FILES[split]
    image_path, label_path = find_file(root, image_stem), find_file(root, label_stem)
    images = read_idx(image_path, _IMAGES_MAGIC)
    labels = read_idx(label_path, _LABELS_MAGIC).astype(np.int64)
    if images.shape[1:] != (28, 28):
        raise DatasetError(f"Fashion-MNIST: {image_path} holds images of {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise DatasetError(f"Fashion-MNIST: {image_path} holds {len(images)} images but {label_path} "
                           f"{len(labels)} labels")
    bad = np.flatnonzero((labels < 0) | (labels >= len(CLASSES)))
    if bad.size:
        raise DatasetError(f"Fashion-MNIST: {label_path} has label {labels[bad[0]]} at index {bad[0]} "
                           f"({bad.size} such); labels lie in 0..{len(CLASSES) - 1}")
    return images, labels


class FashionMNIST(Dataset):
    """Images (1, 28, 28) float32, normalised, and their labels.

    Args:
        images: (N, 28, 28) uint8. labels: (N,) int64.
        augment: random crop (zero-padded by :data:`PAD`) and horizontal flip per sample.
        erase: the probability of random erasing (Zhong et al. 2020) after normalisation: a rectangle of
            2-40 % of the image, aspect 0.3-3.3, filled with standard-normal noise (the normalised images'
            statistics); 0: none.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool = False, erase: float = 0.0) -> None:
        self.images = torch.from_numpy(np.array(images, dtype=np.uint8)).unsqueeze(1)  # (N, 1, 28, 28), a copy
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        self.augment = augment
        self.erase = (RandomErasing(p=erase, scale=(0.02, 0.4), ratio=(0.3, 3.3), value="random")
                      if erase > 0 else None)
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if self.augment:
            h, w = x.shape[1:]
            i, j = torch.randint(0, 2 * PAD + 1, (2,)).tolist()
            x = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))[:, i:i + h, j:j + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        x = (x - MEAN) / STD
        if self.erase is not None:
            x = self.erase(x)
        return x, int(self.labels[index])


def _held_out(cfg, with_train: bool) -> Optional[str]:
    """The split ``DATASET.TEST_SET`` names: 'val', 'test', or None (empty; training only)."""
    if not str(cfg.DATASET.TEST_SET).strip():
        if not with_train:
            raise ConfigError("DATASET.TEST_SET is empty: name the set to evaluate, 'val' (the validation split of "
                              "DATASET.VAL_SIZE training images) or 'test' (the 10,000 test images)")
        return None   # training without a held-out set
    name = split_path(str(cfg.DATASET.TEST_SET).lower(), "{}")   # 'valid' is 'val'
    if name == "val":
        if int(cfg.DATASET.VAL_SIZE) <= 0:
            raise ConfigError("DATASET.TEST_SET 'val' needs DATASET.VAL_SIZE > 0 (the training images to hold out)")
        return "val"
    if name == "test":
        return "test"
    raise ConfigError(f"DATASET.TEST_SET = {cfg.DATASET.TEST_SET!r}: Fashion-MNIST has 'val' (the validation "
                      f"split of DATASET.VAL_SIZE training images) and 'test' (the 10,000 test images)")


def build_fashion_mnist(cfg, with_train: bool = True) -> Tuple[Optional[Dataset], Optional[Dataset]]:
    """(training set, held-out set): the held-out set is ``DATASET.TEST_SET`` ('val' or 'test'; None
    for an empty TEST_SET, which only training accepts); the training set lacks the
    ``DATASET.VAL_SIZE`` validation images whatever the held-out set is, so a run's training data does
    not depend on what it is evaluated on."""
    root = cfg.DATASET.ROOT or DEFAULT_ROOT
    held_out = _held_out(cfg, with_train)
    val_size = int(cfg.DATASET.VAL_SIZE)
    if int(cfg.MODEL.IN_CHANNELS) != 1:
        raise ConfigError(f"MODEL.IN_CHANNELS = {cfg.MODEL.IN_CHANNELS}: Fashion-MNIST images have 1 channel")
    train, val = None, None
    if with_train or held_out == "val":
        images, labels = load_split(root, "train")
        if not 0 <= val_size < len(labels):
            raise ConfigError(f"DATASET.VAL_SIZE = {val_size}: the training set has {len(labels)} images")
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(SPLIT_SEED)).numpy()
        train_idx, val_idx = np.sort(perm[val_size:]), np.sort(perm[:val_size])
        if held_out == "val":
            val = FashionMNIST(images[val_idx], labels[val_idx])
        if with_train:
            train = FashionMNIST(images[train_idx], labels[train_idx], augment=bool(cfg.DATASET.AUGMENT),
                                 erase=float(cfg.DATASET.RANDOM_ERASING))
    if held_out == "test":
        val = FashionMNIST(*load_split(root, "test"))
    return train, val
