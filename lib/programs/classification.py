"""The image-classification programs: ``train`` (``tools/cls_train.py``) and ``test``
(``tools/cls_valid.py``), run by :mod:`mdeq.programs.runner` on
:class:`~mdeq.tasks.classification.ClassificationTask`.

Both take ``--percent`` (the fraction of the training set, PERCENT). ``test`` evaluates a
checkpoint (ours or the original's ``.pkl``) on the held-out set and writes
``valid_results.json`` to the output folder.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn
from torch.utils.data import DataLoader

from ..core.checkpoint_manager import model_files
from ..core.state import make_loader
from ..datasets import build_cls_val_dataset
from ..tasks.classification import ClassificationTask, check_classes, validate
from ..utils.checkpoint import load_weights
from ..utils.distributed import DistInfo
from ..utils.output_files import write_json
from .runner import TaskProgram, run_test, run_train

logger = logging.getLogger(__name__)


class ClassificationProgram(TaskProgram):
    """``--percent``; the held-out set; top-1 in the sweep; ``valid_results.json``."""

    task_class, test_phase = ClassificationTask, "valid"
    descriptions = ("Train an MDEQ image classifier", "Evaluate an MDEQ image classifier")
    sweep_metric = ("top1", "held-out top-1 (%)")

    def add_options(self, parser: argparse.ArgumentParser, test: bool) -> None:
        parser.add_argument("--percent", type=float, default=1.0, help="fraction of the training set (PERCENT)")

    def config_opts(self, args: argparse.Namespace) -> List[Any]:
        return ["PERCENT", float(args.percent)] if args.percent != 1.0 else []

    def test_loader(self, cfg, info: DistInfo) -> DataLoader:
        val_set = build_cls_val_dataset(cfg)
        check_classes(val_set, cfg)
        return make_loader(val_set, cfg, info, train=False)

    def evaluate_at(self, model: nn.Module, loader: DataLoader, cfg, info: DistInfo, f_thres: int
                    ) -> Dict[str, float]:
        return validate(model, loader, cfg, info.device, is_main=info.is_main, f_thres=f_thres)

    def test(self, args: argparse.Namespace, cfg, info: DistInfo, out_dir: str) -> Dict[str, Any]:
        task = self.task_class()
        model = task.build_model(cfg, initial_weights=False).to(info.device)
        [path] = model_files(cfg, out_dir)
        load_weights(model, path)
        logger.info("weights: %s", path)
        summary = task.summary(model, cfg)
        loader = self.test_loader(cfg, info)
        t0 = time.time()
        res = validate(model, loader, cfg, info.device, is_main=info.is_main)
        res.update(model_file=path, time_s=time.time() - t0, **summary)
        logger.info("held-out (%s, %d images): top-1 %.2f%%, top-5 %.2f%%, loss %.4f, %s", cfg.DATASET.DATASET,
                    res["num_samples"], res["top1"], res["top5"], res["loss"], _solver_figures(res))
        if info.is_main:
            write_json(os.path.join(out_dir, "valid_results.json"), res, indent=2)
        return res


def _solver_figures(res: Dict[str, Any]) -> str:
    """The forward solve of an evaluation in words, by what the model computes (``res['forward']``)."""
    if res.get("forward") == "explicit":
        return "explicit network (no equilibrium, no solver)"
    if res.get("forward") == "unrolled":
        return f"unrolled weight-tied stack of depth {res.get('unrolled_depth')} (no equilibrium, no residual)"
    return (f"mean f steps {res.get('f_steps', float('nan')):.2f}, final residual rel "
            f"{res.get('f_rel', float('nan')):.3g} abs {res.get('f_abs', float('nan')):.3g}")


PROGRAM = ClassificationProgram()


def train(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_train.py``: train, checkpoint every epoch, evaluate; returns the final metrics."""
    return run_train(PROGRAM, argv)


def test(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_valid.py``: evaluate a checkpoint on the held-out set (or sweep the forward
    budget); returns the metrics."""
    return run_test(PROGRAM, argv)
