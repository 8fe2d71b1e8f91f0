"""Real image batches for the solver tools, with no dataset on disk.

A solver's behaviour depends on its input: on Gaussian noise (out of any training distribution)
the reference CIFAR model's L-Broyden and plain iteration reach about the same residual after 30
evaluations, on real photographs L-Broyden is ahead. :func:`photo_batch` cuts random crops out of
the two photographs that ship with scikit-learn; :func:`recorded_batch` reads a batch saved as a
tensor (e.g. the recorded input of ``tests/data/reference/cifar_tiny.expected.pt``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import ConfigError
from ..datasets.cifar import MEAN as CIFAR_MEAN, STD as CIFAR_STD
from ..datasets.common import DatasetError
from ..datasets.fashion_mnist import MEAN as FASHION_MEAN, STD as FASHION_STD
from ..datasets.imagenet import MEAN as IMAGENET_MEAN, STD as IMAGENET_STD
from ..utils.checkpoint import CheckpointError, load_checkpoint

Tensor = torch.Tensor


IMAGES_HELP = ("a recorded batch: a .pt file with a (N, 3, H, W) tensor or a dict with one under 'input' "
               "(repeated up to the batch size); default: random crops of scikit-learn's sample photographs")


def normalization(dataset: str):
    """(mean, std) per channel of the normalisation our datasets use: CIFAR-10's, Fashion-MNIST's (one
    grey channel) or ImageNet's."""
    name = dataset.lower()
    if name.startswith("cifar"):
        return CIFAR_MEAN, CIFAR_STD
    if name.startswith("fashion"):
        return (FASHION_MEAN,), (FASHION_STD,)
    return IMAGENET_MEAN, IMAGENET_STD


def photo_batch(batch: int, size: int, mean: Sequence[float], std: Sequence[float], seed: int = 0) -> Tensor:
    """(batch, C, size, size) normalised random square crops (random scale and position) of
    scikit-learn's sample photographs, resized with antialiasing; deterministic for a seed. C is
    ``len(mean)``: 3, or 1 for grey images (the photographs' luma, ITU-R BT.601 weights)."""
    from sklearn.datasets import load_sample_images
    gen = torch.Generator().manual_seed(seed)
    photos = [torch.tensor(p).permute(2, 0, 1).float() / 255 for p in load_sample_images().images]
    crops = []
    for i in range(batch):
        photo = photos[i % len(photos)]
        h, w = photo.shape[1:]
        side = int(torch.randint(min(size, h, w), min(h, w) + 1, (1,), generator=gen))
        top = int(torch.randint(0, h - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, w - side + 1, (1,), generator=gen))
        crop = photo[None, :, top:top + side, left:left + side]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    x = torch.stack(crops)
    if len(mean) == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(1, keepdim=True)
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


def recorded_batch(path: str | Path, batch: int) -> Tensor:
    """``batch`` images from a file holding a (N, 3, H, W) tensor or a dict with one under ``'input'``
    (read with ``weights_only=True``), repeated in order when N < batch.

    Raises:
        DatasetError: a file that is missing, is not a tensor file, or holds no image batch.
    """
    try:
        obj = load_checkpoint(path)
    except (CheckpointError, FileNotFoundError) as e:
        raise DatasetError(f"cannot use {path} as a recorded batch (--images): {e}") from e
    x = obj.get("input") if isinstance(obj, dict) else obj
    if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] not in (1, 3):
        raise DatasetError(f"{path}: expected a (N, 3, H, W) image tensor (or a grey (N, 1, H, W) one), or a dict "
                           f"with one under 'input' (--images)")
    return x[torch.arange(batch) % x.shape[0]].float()


def smallest_input(cfg) -> int:
    """The smallest image side the model of ``cfg`` is measured on: its coarsest resolution stream
    (the stem's MODEL.DOWNSAMPLE_TIMES halvings, then one per further branch) at least 2 pixels wide;
    below that, 3x3 convolutions there see mostly padding and the figures mean nothing."""
    return 2 ** (int(cfg.MODEL.DOWNSAMPLE_TIMES) + int(cfg.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES))


def tool_batch(images: str | Path, batch: int, size: int, cfg, seed: int = 0) -> Tensor:
    """What the solver tools feed the model of ``cfg``: the recorded batch ``images`` if given (its
    own image size), else :func:`photo_batch` crops of side ``size`` normalised as its dataset.

    Raises:
        ConfigError: the images are smaller than :func:`smallest_input`.
    """
    low = smallest_input(cfg)
    if not images and size < low:
        raise ConfigError(f"--image-size {size} is too small for this model: its coarsest stream needs at least "
                          f"{low} pixels (MODEL.DOWNSAMPLE_TIMES {cfg.MODEL.DOWNSAMPLE_TIMES}, "
                          f"{cfg.MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES} branches); MODEL.IMAGE_SIZE is "
                          f"{list(cfg.MODEL.IMAGE_SIZE)}")
    if images:
        return recorded_batch(images, batch)
    return photo_batch(batch, size, *normalization(cfg.DATASET.DATASET), seed=seed)
