"""ImageNet (ILSVRC-2012) as two ImageFolder trees: ``DATASET.ROOT/train/<wnid>/*.JPEG`` and
``DATASET.ROOT/val/<wnid>/*.JPEG`` (the validation images sorted into class folders)."""
from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets, transforms

from .common import DatasetError, require_dir, split_path

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
HINT = ("ImageNet cannot be downloaded automatically: get ILSVRC-2012 from https://image-net.org, "
        "and lay it out as ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG (validation images "
        "sorted into class folders); DATASET.ROOT chooses ROOT.")


def imagenet_transforms(size: int = 224) -> Tuple[Callable, Callable]:
    """(train, val): RandomResizedCrop + flip; Resize(256/224 * size) + CenterCrop(size). Normalised."""
    norm = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    train = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] + norm)
    val = transforms.Compose([transforms.Resize(int(round(size * 256 / 224))), transforms.CenterCrop(size)] + norm)
    return train, val


def pil_loader(path: str) -> Image.Image:
    """Open ``path`` as an RGB PIL image; an unreadable or truncated file is a :class:`DatasetError`
    naming it (instead of PIL's error from inside a DataLoader worker)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            return img.convert("RGB")  # decodes the whole file: a truncated one fails here
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"cannot read image {path}: {e} (unreadable or truncated: replace or remove the "
                           f"file)") from e


def _folder(path: str, transform: Callable, split: str) -> Dataset:
    require_dir(path, f"ImageNet {split} split not found", HINT)
    try:
        return datasets.ImageFolder(path, transform=transform, loader=pil_loader)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images
        raise FileNotFoundError(f"ImageNet {split} split at {os.path.abspath(path)} is empty or malformed: {e}. "
                                f"{HINT}") from e


def build_imagenet(cfg, with_train: bool = True) -> Tuple[Optional[Dataset], Dataset]:
    """(train, val) ImageFolders under ``DATASET.ROOT``: the folders of the splits DATASET.TRAIN_SET /
    TEST_SET (see :func:`~mdeq.datasets.common.split_path`)."""
    root = cfg.DATASET.ROOT or "data/imagenet"
    size = int(cfg.MODEL.IMAGE_SIZE[0]) if cfg.MODEL.IMAGE_SIZE else 224
    train_tf, val_tf = imagenet_transforms(size)
    val = _folder(os.path.join(root, split_path(cfg.DATASET.TEST_SET or "val", "{}")), val_tf, "val")
    if not with_train:
        return None, val
    train = _folder(os.path.join(root, split_path(cfg.DATASET.TRAIN_SET or "train", "{}")), train_tf, "train")
    if len(train.classes) != len(val.classes):
        raise FileNotFoundError(f"ImageNet under {os.path.abspath(root)}: train has {len(train.classes)} class "
                                f"folders but val has {len(val.classes)}")
    return train, val
