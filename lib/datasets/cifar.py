"""CIFAR-10 from the standard ``cifar-10-batches-py`` folder (the python version of the dataset).

Layout: ``DATASET.ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``, each a
pickled dict with ``data`` (N, 3072) uint8 (R, G, B planes of 32x32) and ``labels``. The batches
are read with a restricted unpickler that only builds numpy arrays and builtin containers (the
files are pickles; arbitrary code in a tampered file is refused). ``DATASET.DOWNLOAD`` lets
torchvision download and check the archive when the folder is missing.
"""
from __future__ import annotations

import logging
import os
import pickle
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms

from .common import DatasetError, check_labels, require_dir, require_files

logger = logging.getLogger(__name__)

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
BASE_FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
NUM_CLASSES = 10

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor"),
    ("__builtin__", "object"), ("builtins", "object"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def read_batch(path: str) -> dict:
    """One CIFAR batch file as a dict with str keys."""
    try:
        with open(path, "rb") as f:
            entry = _SafeUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"cannot read CIFAR batch {path}: {e} (truncated or tampered? extract "
                           f"cifar-10-python.tar.gz again)") from e
    if not isinstance(entry, dict):
        raise DatasetError(f"CIFAR batch {path} holds a {type(entry).__name__}, expected a dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in entry.items()}


class CIFAR10(Dataset):
    """CIFAR-10 images (PIL, RGB 32x32) and labels, optionally transformed.

    Args:
        root: the folder that contains ``cifar-10-batches-py``.
        train: the five training batches (50,000 images) or the test batch (10,000).
        transform: applied to each PIL image.
        download: download the archive from :data:`URL` via torchvision if the folder is missing.
    """

    def __init__(self, root: str, train: bool = True, transform: Optional[Callable] = None,
                 download: bool = False) -> None:
        self.root = root
        self.train = train
        self.transform = transform
        folder = os.path.join(root, BASE_FOLDER)
        if download and not os.path.isdir(folder):
            from torchvision.datasets.utils import download_and_extract_archive
            logger.info("downloading CIFAR-10 from %s to %s", URL, root)
            download_and_extract_archive(URL, root, filename="cifar-10-python.tar.gz",
                                         md5="c58f30108f718f92721af3b95e74349a")
        hint = (f"Download {URL} and extract it into {os.path.abspath(root)} "
                f"(tar xzf cifar-10-python.tar.gz -C {root}), or set DATASET.DOWNLOAD True; "
                f"DATASET.ROOT chooses the parent folder.")
        require_dir(folder, "CIFAR-10 not found", hint)
        files = TRAIN_FILES if train else TEST_FILES
        require_files(folder, files, "CIFAR-10 incomplete", hint)
        data: List[np.ndarray] = []
        labels: List[int] = []
        for name in files:
            entry = read_batch(os.path.join(folder, name))
            if "data" not in entry or not ("labels" in entry or "fine_labels" in entry):
                raise DatasetError(f"CIFAR batch {os.path.join(folder, name)} lacks 'data' or 'labels' "
                                   f"(keys: {sorted(entry)})")
            arr = np.asarray(entry["data"], dtype=np.uint8)
            if arr.ndim != 2 or arr.shape[1] != 3072:
                raise DatasetError(f"CIFAR batch {name}: 'data' has shape {arr.shape}, expected (N, 3072)")
            data.append(arr)
            batch_labels = [int(v) for v in entry.get("labels", entry.get("fine_labels"))]
            check_labels(batch_labels, NUM_CLASSES, f"CIFAR batch {os.path.join(folder, name)}")
            labels.extend(batch_labels)
        self.data = np.concatenate(data).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()  # NHWC
        self.targets = labels
        if len(self.targets) != len(self.data):
            raise DatasetError(f"CIFAR-10 in {folder}: {len(self.data)} images but {len(self.targets)} labels")
        meta = os.path.join(folder, "batches.meta")
        names = read_batch(meta).get("label_names", []) if os.path.isfile(meta) else []
        self.classes = [c.decode("latin1") if isinstance(c, bytes) else str(c) for c in names]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.data[index])
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def cifar_transforms(augment: bool) -> Tuple[Callable, Callable]:
    """(train transform, test transform): random crop (pad 4) + flip when ``augment``; normalised."""
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    return transforms.Compose(train + norm), transforms.Compose(norm)


def build_cifar10(cfg, with_train: bool = True) -> Tuple[Optional[Dataset], Dataset]:
    """(train, test) CIFAR-10 from ``DATASET.ROOT`` (``DATASET.AUGMENT``, ``DATASET.DOWNLOAD``);
    train is None unless ``with_train``."""
    root = cfg.DATASET.ROOT or "data/cifar10"
    train_tf, test_tf = cifar_transforms(cfg.DATASET.AUGMENT)
    train = CIFAR10(root, train=True, transform=train_tf, download=cfg.DATASET.DOWNLOAD) if with_train else None
    val = CIFAR10(root, train=False, transform=test_tf, download=cfg.DATASET.DOWNLOAD)
    return train, val
