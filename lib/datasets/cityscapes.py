"""Cityscapes semantic segmentation (fine annotations), in the original MDEQ / HRNet layout.

Layout (relative to ``DATASET.ROOT``)::

    cityscapes/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    cityscapes/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
    list/cityscapes/{train,val,test}.lst

Each list line is ``<image path> <label path>`` relative to ``ROOT/cityscapes``; lines of the
test list hold the image path only. Labels are the official label ids (0..33; -1 is the licence
plate, which never appears in the 8-bit PNGs) and are mapped to the 19 train ids, every other id
to the ignore label. Images are decoded with OpenCV, turned to RGB and normalised with the
ImageNet mean and standard deviation.

Training samples are randomly rescaled (``TRAIN.MULTI_SCALE``: the longer side becomes
``BASE_SIZE * (0.5 + randint(0, SCALE_FACTOR) / 10)``), randomly cropped to ``TRAIN.IMAGE_SIZE``
(width, height; images smaller than the crop are padded with 0 after normalisation, i.e. with the
mean colour, and labels with the ignore label), and flipped horizontally (``TRAIN.FLIP``).
Validation and test samples are full-resolution images.
"""
from __future__ import annotations

import logging
import os
import random
from collections import namedtuple
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from ..config.loader import ConfigError
from .common import DatasetError, ignore_label, split_path

logger = logging.getLogger(__name__)

# one thread per worker: OpenCV's own thread pool fights the DataLoader workers
cv2.setNumThreads(0)

Label = namedtuple("Label", ["name", "id", "train_id", "color"])

#: The official Cityscapes labels (cityscapesScripts, helpers/labels.py): name, label id, train id,
#: colour (RGB). Train id 255 is ignored in training and evaluation.
LABELS: Tuple[Label, ...] = (
    Label("unlabeled", 0, 255, (0, 0, 0)),
    Label("ego vehicle", 1, 255, (0, 0, 0)),
    Label("rectification border", 2, 255, (0, 0, 0)),
    Label("out of roi", 3, 255, (0, 0, 0)),
    Label("static", 4, 255, (0, 0, 0)),
    Label("dynamic", 5, 255, (111, 74, 0)),
    Label("ground", 6, 255, (81, 0, 81)),
    Label("road", 7, 0, (128, 64, 128)),
    Label("sidewalk", 8, 1, (244, 35, 232)),
    Label("parking", 9, 255, (250, 170, 160)),
    Label("rail track", 10, 255, (230, 150, 140)),
    Label("building", 11, 2, (70, 70, 70)),
    Label("wall", 12, 3, (102, 102, 156)),
    Label("fence", 13, 4, (190, 153, 153)),
    Label("guard rail", 14, 255, (180, 165, 180)),
    Label("bridge", 15, 255, (150, 100, 100)),
    Label("tunnel", 16, 255, (150, 120, 90)),
    Label("pole", 17, 5, (153, 153, 153)),
    Label("polegroup", 18, 255, (153, 153, 153)),
    Label("traffic light", 19, 6, (250, 170, 30)),
    Label("traffic sign", 20, 7, (220, 220, 0)),
    Label("vegetation", 21, 8, (107, 142, 35)),
    Label("terrain", 22, 9, (152, 251, 152)),
    Label("sky", 23, 10, (70, 130, 180)),
    Label("person", 24, 11, (220, 20, 60)),
    Label("rider", 25, 12, (255, 0, 0)),
    Label("car", 26, 13, (0, 0, 142)),
    Label("truck", 27, 14, (0, 0, 70)),
    Label("bus", 28, 15, (0, 60, 100)),
    Label("caravan", 29, 255, (0, 0, 90)),
    Label("trailer", 30, 255, (0, 0, 110)),
    Label("train", 31, 16, (0, 80, 100)),
    Label("motorcycle", 32, 17, (0, 0, 230)),
    Label("bicycle", 33, 18, (119, 11, 32)),
    Label("license plate", -1, 255, (0, 0, 142)),
)

NUM_TRAIN_CLASSES = 19
#: where a split's list lies under DATASET.ROOT (DATASET.TRAIN_SET / TEST_SET name the split)
LIST_PATTERN = "list/cityscapes/{}.lst"
#: names of the 19 train ids, in train-id order
CLASS_NAMES: Tuple[str, ...] = tuple(
    next(l.name for l in LABELS if l.train_id == t) for t in range(NUM_TRAIN_CLASSES))
#: (19, 3) uint8 RGB colours of the train ids (the official palette)
PALETTE: np.ndarray = np.array(
    [next(l.color for l in LABELS if l.train_id == t) for t in range(NUM_TRAIN_CLASSES)], dtype=np.uint8)
#: train id -> label id (what the benchmark server expects); 255 -> 0 (unlabeled)
TRAIN_ID_TO_LABEL_ID: np.ndarray = np.zeros(256, dtype=np.uint8)
for _l in LABELS:
    if 0 <= _l.train_id < NUM_TRAIN_CLASSES:
        TRAIN_ID_TO_LABEL_ID[_l.train_id] = _l.id

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CityscapesError(DatasetError):
    """A problem with the Cityscapes files (list, image or label), naming the file."""


def label_id_lut(ignore_label: int = 255) -> np.ndarray:
    """Look-up table over label ids -1..255 (index ``id + 1``) -> train ids, others -> ``ignore_label``."""
    lut = np.full(257, ignore_label, dtype=np.int64)
    for l in LABELS:
        if 0 <= l.train_id < NUM_TRAIN_CLASSES:
            lut[l.id + 1] = l.train_id
    return lut


def label_ids_to_train_ids(label: np.ndarray, ignore_label: int = 255) -> np.ndarray:
    """Map an array of official label ids (any integer type, -1 allowed) to train ids (int64)."""
    label = np.asarray(label)
    ids = label.astype(np.int64)
    out = np.full(ids.shape, ignore_label, dtype=np.int64)
    inside = (ids >= -1) & (ids <= 255)
    out[inside] = label_id_lut(ignore_label)[ids[inside] + 1]
    return out


#: the largest official label id (the licence plate's -1 never appears in the 8-bit label images)
MAX_LABEL_ID = max(l.id for l in LABELS)


def check_label_ids(label: np.ndarray, path: str) -> None:
    """Raise :class:`CityscapesError` naming ``path`` unless ``label`` is an 8-bit image of official
    label ids (0..33): a 16-bit image, or ids beyond 33 (a train-id image with 255, an instance-id
    image), would otherwise be mapped silently or fail with an index error far from the file."""
    top = int(label.max()) if label.size else 0
    if label.dtype != np.uint8:
        raise CityscapesError(f"label {path} is a {label.dtype} image (values up to {top}); expected 8-bit label "
                              f"ids 0..{MAX_LABEL_ID} (*_gtFine_labelIds.png)")
    if top > MAX_LABEL_ID:
        raise CityscapesError(f"label {path} holds the value {top}, beyond the official label ids 0..{MAX_LABEL_ID}: "
                              f"the list needs *_gtFine_labelIds.png (not *_labelTrainIds.png or *_instanceIds.png)")


def train_ids_to_label_ids(pred: np.ndarray) -> np.ndarray:
    """Map train ids (0..18; anything else -> 0 'unlabeled') to official label ids, uint8."""
    pred = np.asarray(pred).astype(np.int64)
    out = np.zeros(pred.shape, dtype=np.uint8)
    valid = (pred >= 0) & (pred < NUM_TRAIN_CLASSES)
    out[valid] = TRAIN_ID_TO_LABEL_ID[pred[valid]]
    return out


def colorize(pred: np.ndarray) -> np.ndarray:
    """Train ids (H, W) -> RGB (H, W, 3) uint8 in the official palette; other values black."""
    pred = np.asarray(pred).astype(np.int64)
    out = np.zeros(pred.shape + (3,), dtype=np.uint8)
    valid = (pred >= 0) & (pred < NUM_TRAIN_CLASSES)
    out[valid] = PALETTE[pred[valid]]
    return out


def read_list(list_path: str, need_labels: bool) -> List[Tuple[str, Optional[str]]]:
    """Parse a list file into (image, label or None) pairs (paths as written in the file)."""
    if not os.path.isfile(list_path):
        raise FileNotFoundError(f"Cityscapes list file not found: {list_path} (see data/README.md for the layout)")
    items: List[Tuple[str, Optional[str]]] = []
    with open(list_path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2:
                raise CityscapesError(f"{list_path}:{lineno}: expected '<image> <label>', got {line.strip()!r}")
            if need_labels and len(parts) < 2:
                raise CityscapesError(f"{list_path}:{lineno}: image {parts[0]} has no label path "
                                      f"(train and val lists need '<image> <label>')")
            items.append((parts[0], parts[1] if len(parts) == 2 else None))
    if not items:
        raise CityscapesError(f"Cityscapes list file {list_path} is empty")
    return items


def require_cityscapes(cfg) -> None:
    """Raise ConfigError unless ``cfg`` is a Cityscapes config (what the segmentation tools take),
    before anything is built or written."""
    if cfg.DATASET.DATASET != "cityscapes":
        raise ConfigError(f"segmentation trains and tests on Cityscapes, but DATASET.DATASET is "
                          f"{cfg.DATASET.DATASET!r}: a classification config? Classifiers train with "
                          f"tools/cls_train.py; segmentation configs are in experiments/cityscapes/")


class CityscapesDataset(Dataset):
    """Cityscapes images and train-id labels.

    ``dataset[i]`` is ``(image, label, name)``: image a float tensor (3, H, W) normalised with
    ``mean``/``std``, label an int64 tensor (H, W) of train ids with ``ignore_label`` (all
    ``ignore_label`` for an unlabelled test image), name the image file name without extension
    (``<city>_<seq>_<frame>_leftImg8bit``).

    Args:
        root: folder holding ``cityscapes/`` and ``list/``.
        list_path: list file, relative to ``root`` (or absolute).
        train: apply the training augmentation (rescale, crop, flip).
        crop_size: (height, width) of the training crops.
        base_size: the longer side before random rescaling.
        multi_scale, scale_factor: random rescaling by ``0.5 + randint(0, scale_factor) / 10``.
        flip: random horizontal flips (training).
        downsample_rate: labels of training samples are resized by ``1 / downsample_rate``.
        labeled: whether the list carries labels (None: every line decides, a list without labels
            is allowed only if no line has one).
    """

    def __init__(self, root: str, list_path: str, train: bool = False, num_classes: int = NUM_TRAIN_CLASSES,
                 crop_size: Tuple[int, int] = (512, 1024), base_size: int = 2048, multi_scale: bool = True,
                 scale_factor: int = 16, flip: bool = True, ignore_label: int = 255, downsample_rate: int = 1,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 labeled: Optional[bool] = None) -> None:
        if num_classes != NUM_TRAIN_CLASSES:
            raise ConfigError(f"Cityscapes has {NUM_TRAIN_CLASSES} train classes; MODEL.NUM_CLASSES is {num_classes}")
        self.root = root
        self.base = os.path.join(root, "cityscapes")
        self.list_path = list_path if os.path.isabs(list_path) else os.path.join(root, list_path)
        self.train = train
        self.crop_size = tuple(int(v) for v in crop_size)
        self.base_size = int(base_size)
        self.multi_scale = multi_scale
        self.scale_factor = int(scale_factor)
        self.flip = flip
        self.ignore_label = int(ignore_label)
        self.downsample_rate = int(downsample_rate)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.num_classes = num_classes
        self._lut = label_id_lut(self.ignore_label)

        items = read_list(self.list_path, need_labels=bool(train or labeled))
        with_label = [lab is not None for _, lab in items]
        if any(with_label) and not all(with_label):
            first = items[with_label.index(False)][0]
            raise CityscapesError(f"{self.list_path}: image {first} has no label path while other lines have one")
        self.labeled = all(with_label)
        self.files = []
        for img, lab in items:
            img_path = os.path.join(self.base, img)
            if not os.path.isfile(img_path):
                raise FileNotFoundError(f"image listed in {self.list_path} not found: {img_path}")
            lab_path = None
            if lab is not None:
                lab_path = os.path.join(self.base, lab)
                if not os.path.isfile(lab_path):
                    raise FileNotFoundError(f"label of {img_path} (listed in {self.list_path}) not found: {lab_path}")
            name = os.path.splitext(os.path.basename(img))[0]
            self.files.append({"img": img_path, "label": lab_path, "name": name})
        if self.labeled and self.files:
            # the first label read now: a list of the wrong label files (train ids, instance ids,
            # 16-bit) fails here, not at its first batch; every label is checked again when read
            self.load_label(0)
        logger.info("Cityscapes %s: %d images%s", self.list_path, len(self.files),
                    "" if self.labeled else " (no labels)")

    @classmethod
    def from_config(cls, cfg, split: str = "train", list_path: Optional[str] = None) -> "CityscapesDataset":
        """``split='train'``: the list of TRAIN_SET with augmentation; ``'val'``/``'test'``: that of TEST_SET
        (or ``list_path``) at full resolution. A split name (``'val'``) is ``list/cityscapes/val.lst``."""
        train = split == "train"
        if list_path is None:
            list_path = split_path(cfg.DATASET.TRAIN_SET if train else cfg.DATASET.TEST_SET, LIST_PATTERN)
        w, h = cfg.TRAIN.IMAGE_SIZE
        return cls(cfg.DATASET.ROOT, list_path, train=train, num_classes=cfg.MODEL.NUM_CLASSES,
                   crop_size=(h, w), base_size=cfg.TRAIN.BASE_SIZE, multi_scale=cfg.TRAIN.MULTI_SCALE,
                   scale_factor=cfg.TRAIN.SCALE_FACTOR, flip=cfg.TRAIN.FLIP, ignore_label=ignore_label(cfg),
                   downsample_rate=cfg.TRAIN.DOWNSAMPLERATE, labeled=None if split == "test" else True)

    def __len__(self) -> int:
        return len(self.files)

    # ------------------------------------------------------------------ decoding
    def load_image(self, index: int) -> np.ndarray:
        """The RGB image (H, W, 3) uint8 of sample ``index``."""
        path = self.files[index]["img"]
        img = cv2.imread(path, cv2.IMREAD_COLOR)
        if img is None:
            raise CityscapesError(f"cannot read image {path} (missing, truncated or not an image)")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    def load_label(self, index: int) -> Optional[np.ndarray]:
        """Train ids (H, W) int64 of sample ``index`` (None without a label)."""
        path = self.files[index]["label"]
        if path is None:
            return None
        lab = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        if lab is None:
            raise CityscapesError(f"cannot read label {path} (missing, truncated or not an image)")
        if lab.ndim != 2:
            raise CityscapesError(f"label {path} has shape {lab.shape}; expected a single-channel image of "
                                  f"label ids (*_gtFine_labelIds.png, not the colour image)")
        check_label_ids(lab, path)
        return self._lut[lab.astype(np.int64) + 1]

    def normalize(self, img: np.ndarray) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 (H, W, 3), ImageNet-normalised."""
        return (img.astype(np.float32) / 255.0 - self.mean) / self.std

    # ------------------------------------------------------------------ augmentation
    def _rescale(self, img: np.ndarray, lab: np.ndarray, scale: float) -> Tuple[np.ndarray, np.ndarray]:
        h, w = lab.shape
        long_size = int(self.base_size * scale + 0.5)
        if h > w:
            nh, nw = long_size, max(1, int(w * long_size / h + 0.5))
        else:
            nw, nh = long_size, max(1, int(h * long_size / w + 0.5))
        img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
        lab = cv2.resize(lab.astype(np.uint8), (nw, nh), interpolation=cv2.INTER_NEAREST).astype(np.int64)
        return img, lab

    def _random_crop(self, img: np.ndarray, lab: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        ch, cw = self.crop_size
        h, w = lab.shape
        ph, pw = max(ch - h, 0), max(cw - w, 0)
        if ph or pw:
            img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=(0.0, 0.0, 0.0))
            lab = np.pad(lab, ((0, ph), (0, pw)), constant_values=self.ignore_label)
            h, w = lab.shape
        y = random.randint(0, h - ch)
        x = random.randint(0, w - cw)
        return img[y:y + ch, x:x + cw], lab[y:y + ch, x:x + cw]

    def __getitem__(self, index: int):
        item = self.files[index]
        img = self.load_image(index)
        lab = self.load_label(index)
        if lab is not None and lab.shape != img.shape[:2]:
            raise CityscapesError(f"image {item['img']} is {img.shape[1]}x{img.shape[0]} but its label "
                                  f"{item['label']} is {lab.shape[1]}x{lab.shape[0]}")
        if lab is None:
            lab = np.full(img.shape[:2], self.ignore_label, dtype=np.int64)
        if self.train:
            if self.multi_scale:
                scale = 0.5 + random.randint(0, self.scale_factor) / 10.0
                img, lab = self._rescale(img, lab, scale)
            img = self.normalize(img)
            img, lab = self._random_crop(img, lab)
            if self.flip and random.random() < 0.5:
                img, lab = img[:, ::-1], lab[:, ::-1]
            if self.downsample_rate != 1:
                h, w = lab.shape
                size = (max(1, w // self.downsample_rate), max(1, h // self.downsample_rate))
                lab = cv2.resize(lab.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(np.int64)
        else:
            img = self.normalize(img)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        label = torch.from_numpy(np.ascontiguousarray(lab))
        return image, label, item["name"]
