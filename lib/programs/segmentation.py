"""The Cityscapes programs: ``train`` (``tools/seg_train.py``) and ``test`` (``tools/seg_test.py``), run
by :mod:`mdeq.programs.runner` on :class:`~mdeq.tasks.segmentation.SegmentationTask`.

``test`` evaluates ``DATASET.TEST_SET``. A labelled list gives the scores (logged and written to
``<output>/<list>_results.json``) and, under ``<output>/<list>_results/``, label-id images and
(unless ``--no-pictures``) colour predictions and overlays; an unlabelled list gives the label-id
images the benchmark server expects and colour images.
"""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch.nn as nn
from torch.utils.data import DataLoader

from ..core.checkpoint_manager import model_files
from ..core.state import make_loader
from ..datasets.cityscapes import CLASS_NAMES, CityscapesDataset, colorize, require_cityscapes, train_ids_to_label_ids
from ..datasets.common import ignore_label
from ..models.inference import evaluation_model
from ..tasks.segmentation import SegmentationTask, evaluate, format_scores
from ..utils.checkpoint import load_weights
from ..utils.distributed import DistInfo
from ..utils.output_files import write_bytes, write_json
from .runner import TaskProgram, run_test, run_train

logger = logging.getLogger(__name__)


def _scales(cfg) -> List[float]:
    return list(cfg.TEST.SCALE_LIST) if cfg.TEST.MULTI_SCALE else [1.0]


def _write_png(path: str, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    ok, png = cv2.imencode(".png", array)
    if not ok:
        raise ValueError(f"cannot encode a {array.shape} {array.dtype} picture as PNG for {path}")
    write_bytes(path, png.tobytes())


class SegmentationProgram(TaskProgram):
    """Cityscapes required; ``--no-pictures``; strict loading; mIoU (%) in the sweep."""

    task_class, sweep_metric = SegmentationTask, ("miou", "mIoU (%)")   # test_phase: "test"
    descriptions = ("Train an MDEQ on Cityscapes", "Evaluate a Cityscapes MDEQ")

    def add_options(self, parser: argparse.ArgumentParser, test: bool) -> None:
        if test:
            parser.add_argument("--no-pictures", dest="pictures", action="store_false",
                                help="do not write prediction pictures of a labelled list")

    def check_config(self, cfg) -> None:
        require_cityscapes(cfg)

    def load(self, model: nn.Module, path: str) -> None:
        load_weights(model, path, strict=True)

    def test_loader(self, cfg, info: DistInfo) -> DataLoader:
        return make_loader(CityscapesDataset.from_config(cfg, "test"), cfg, info, train=False)

    def evaluate_at(self, model: nn.Module, loader: DataLoader, cfg, info: DistInfo, f_thres: int
                    ) -> Dict[str, float]:
        s = evaluate(model, loader, cfg.MODEL.NUM_CLASSES, info.device, ignore_label(cfg), scales=_scales(cfg),
                     flip=cfg.TEST.FLIP_TEST, is_main=info.is_main, class_names=CLASS_NAMES, f_thres=f_thres,
                     amp=bool(cfg.TRAIN.AMP))
        return {"miou": 100.0 * s["miou"], "f_steps": s["mean_f_steps"], "f_rel": s["mean_f_rel"]}

    def test(self, args: argparse.Namespace, cfg, info: DistInfo, out_dir: str) -> Dict[str, Any]:
        return _test(cfg, info, out_dir, pictures=args.pictures)


def _test(cfg, info: DistInfo, out_dir: str, pictures: bool = True) -> Dict[str, Any]:
    [model_file] = model_files(cfg, out_dir)
    model = SegmentationTask().build_model(cfg, initial_weights=False)
    load_weights(model, model_file, strict=True)
    model = evaluation_model(model.to(info.device), cfg)
    logger.info("evaluating %s", model_file)
    dataset = CityscapesDataset.from_config(cfg, "test")
    list_name = os.path.splitext(os.path.basename(cfg.DATASET.TEST_SET))[0]
    pic_dir = os.path.join(out_dir, f"{list_name}_results")
    by_name = {f["name"]: i for i, f in enumerate(dataset.files)}
    scales = _scales(cfg)

    def write(pred: np.ndarray, name: str) -> None:
        # label ids: the benchmark's format and name (same base name as the input image)
        _write_png(os.path.join(pic_dir, "label_ids", f"{name}.png"), train_ids_to_label_ids(pred))
        if dataset.labeled and not pictures:
            return
        color = colorize(pred)
        _write_png(os.path.join(pic_dir, "color", f"{name}.png"), color)
        if dataset.labeled:
            image = dataset.load_image(by_name[name])
            _write_png(os.path.join(pic_dir, "overlay", f"{name}.png"), cv2.addWeighted(image, 0.5, color, 0.5, 0.0))

    scores = evaluate(model, make_loader(dataset, cfg, info, train=False), cfg.MODEL.NUM_CLASSES, info.device,
                      ignore_label(cfg), scales=scales, flip=cfg.TEST.FLIP_TEST, is_main=info.is_main,
                      class_names=CLASS_NAMES, on_prediction=write, amp=bool(cfg.TRAIN.AMP))
    if not dataset.labeled:
        logger.info("%d predictions (label ids, benchmark format) written to %s; mean solver steps %.2f",
                    scores["images"], os.path.join(pic_dir, "label_ids"), scores["mean_f_steps"])
        return {"images": scores["images"], "mean_f_steps": scores["mean_f_steps"], "output": pic_dir}
    logger.info("%s (%d images, scales %s, flip %s):\n%s", cfg.DATASET.TEST_SET, scores["images"], scales,
                cfg.TEST.FLIP_TEST, format_scores(scores))
    if info.is_main:
        report = {k: scores[k] for k in ("miou", "pixel_acc", "mean_class_acc", "mean_f_steps", "iou_per_class",
                                         "images", "pixels", "confusion")}
        report.update(model_file=model_file, list=cfg.DATASET.TEST_SET, scales=scales, flip=cfg.TEST.FLIP_TEST)
        json_path = os.path.join(out_dir, f"{list_name}_results.json")
        write_json(json_path, report, indent=2, allow_nan=True)
        logger.info("results written to %s, pictures to %s", json_path, pic_dir)
    return scores


PROGRAM = SegmentationProgram()


def train(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/seg_train.py``: train, checkpoint every epoch, evaluate on the validation list."""
    return run_train(PROGRAM, argv)


def test(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/seg_test.py``: evaluate a checkpoint on DATASET.TEST_SET (or sweep the forward budget)."""
    return run_test(PROGRAM, argv)
