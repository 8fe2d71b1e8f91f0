"""Keys of the original MDEQ / HRNet configuration that this implementation does not use.

The original's experiment files carry keys from HRNet's pose-estimation code (joints, heatmaps,
NMS thresholds, debug images) and a few settings that nothing reads (``TRAIN.EXTRA_LR``,
``DATASET.FLIP``, which ``TRAIN.FLIP`` shadows, ...). They are not defaults here: setting one
would do nothing. A file or override that sets them still loads, so that the original's yaml
files work unchanged, and :func:`split_ignored` collects them for one warning that names them all
(with what to use instead where there is something). A key that neither the original nor this
implementation knows stays an error.

Two facts the original states twice have one key here (:data:`RENAMED`): whether to resume
(``AUTO_RESUME``, HRNet's name, is ``TRAIN.RESUME``) and the number of classes (the original's
segmentation files set ``DATASET.NUM_CLASSES``, its classification files ``MODEL.NUM_CLASSES``: it
is ``MODEL.NUM_CLASSES``, the width of the model's output, checked against the dataset). The
original's name still loads: its value is applied to the key that owns the fact, and the warning
names it.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

from .default import get_default_config
from .validation import ConfigError

#: full key -> what to use instead ('' where nothing corresponds)
IGNORED: Dict[str, str] = {
    "GPUS": "torchrun --nproc_per_node and CUDA_VISIBLE_DEVICES choose the devices",
    "RANK": "torchrun sets the RANK environment variable",
    "MODEL.INIT_WEIGHTS": "",
    "MODEL.NUM_JOINTS": "",
    "MODEL.TAG_PER_JOINT": "",
    "MODEL.TARGET_TYPE": "",
    "MODEL.HEATMAP_SIZE": "",
    "MODEL.SIGMA": "",
    "LOSS.CLASS_BALANCE": "",
    "LOSS.TOPK": "",
    "LOSS.USE_TARGET_WEIGHT": "",
    "LOSS.USE_DIFFERENT_JOINTS_WEIGHT": "",
    "DATASET.DATA_FORMAT": "",
    "DATASET.HYBRID_JOINTS_TYPE": "",
    "DATASET.SELECT_DATA": "",
    "DATASET.EXTRA_TRAIN_SET": "",
    "DATASET.FLIP": "TRAIN.FLIP",
    "DATASET.SCALE_FACTOR": "TRAIN.SCALE_FACTOR",
    "DATASET.ROT_FACTOR": "",
    "DATASET.PROB_HALF_BODY": "",
    "DATASET.NUM_JOINTS_HALF_BODY": "",
    "DATASET.COLOR_RGB": "",
    "TRAIN.EXTRA_LR": "",
    "TRAIN.GAMMA1": "",
    "TRAIN.GAMMA2": "",
    "TRAIN.EXTRA_EPOCH": "",
    "TEST.IMAGE_SIZE": "evaluation runs on full-resolution images (TEST.SCALE_LIST for other scales)",
    "TEST.BASE_SIZE": "evaluation runs on full-resolution images (TEST.SCALE_LIST for other scales)",
    "TEST.NUM_SAMPLES": "",
    "TEST.POST_PROCESS": "",
    "TEST.SHIFT_HEATMAP": "",
    "TEST.CENTER_CROP_TEST": "",
    "TEST.USE_GT_BBOX": "",
    "TEST.IMAGE_THRE": "",
    "TEST.NMS_THRE": "",
    "TEST.SOFT_NMS": "",
    "TEST.OKS_THRE": "",
    "TEST.IN_VIS_THRE": "",
    "TEST.COCO_BBOX_FILE": "",
    "TEST.BBOX_THRE": "",
    "DEBUG.DEBUG": "",
    "DEBUG.SAVE_BATCH_IMAGES_GT": "",
    "DEBUG.SAVE_BATCH_IMAGES_PRED": "",
    "DEBUG.SAVE_HEATMAPS_GT": "",
    "DEBUG.SAVE_HEATMAPS_PRED": "",
}

#: the original's second name of a fact -> the key that owns it here (the value is applied there)
RENAMED: Dict[str, str] = {
    "AUTO_RESUME": "TRAIN.RESUME",
    "DATASET.NUM_CLASSES": "MODEL.NUM_CLASSES",
}

#: sections of the original that hold ignored keys only (``DEBUG``): not in the defaults at all
IGNORED_SECTIONS = frozenset(k.split(".")[0] for k in IGNORED if "." in k) - set(get_default_config().keys())


def split_ignored(data: Dict[str, Any], prefix: str = "") -> Tuple[Dict[str, Any], List[str]]:
    """``data`` (a nested mapping from a yaml file) without the keys of :data:`IGNORED`, and those keys.

    A section of ignored keys only (``DEBUG``) goes when every key in it is one of the original's.
    """
    kept: Dict[str, Any] = {}
    ignored: List[str] = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in IGNORED:
            ignored.append(full)
        elif isinstance(value, dict):
            sub, sub_ignored = split_ignored(value, full + ".")
            ignored += sub_ignored
            if sub or full not in IGNORED_SECTIONS:
                kept[key] = sub
        else:
            kept[key] = value
    return kept, ignored


def _pop(data: Dict[str, Any], key: str) -> Tuple[bool, Any]:
    """(whether the dotted ``key`` is in the nested ``data``, its value), removing it."""
    *sections, last = key.split(".")
    for part in sections:
        data = data.get(part) if isinstance(data, dict) else None
    if not isinstance(data, dict) or last not in data:
        return False, None
    return True, data.pop(last)


def apply_renamed(data: Dict[str, Any], source: str) -> List[str]:
    """Move the values of :data:`RENAMED`'s keys in ``data`` (a nested mapping from a yaml file, changed
    in place) to the keys that own them; returns the original's keys found.

    Raises:
        ConfigError: a file that sets both names of one fact to different values.
    """
    found = []
    for old, new in RENAMED.items():
        present, value = _pop(data, old)
        if not present:
            continue
        found.append(old)
        *sections, last = new.split(".")
        node = data
        for part in sections:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: config key {part} is a section; got the value {node!r}")
        if last in node and node[last] != value:
            raise ConfigError(f"{source}: {old} = {value!r} and {new} = {node[last]!r} name one setting "
                              f"({new}); give it once")
        node[last] = value
    return found


def describe(keys: List[str]) -> str:
    """The original's ``keys``: the ignored ones with what to use instead where there is something,
    the renamed ones with the key their value went to."""
    return ", ".join(f"{k} (applied as {RENAMED[k]})" if k in RENAMED else
                     f"{k} (use {IGNORED[k]})" if IGNORED[k].startswith(("TRAIN.", "TEST.")) else
                     f"{k} ({IGNORED[k]})" if IGNORED[k] else k for k in keys)
