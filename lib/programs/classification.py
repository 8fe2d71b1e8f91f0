"""The image-classification programs: ``train`` (``tools/cls_train.py``) and ``test``
(``tools/cls_valid.py``), run by :mod:`mdeq.programs.runner` on
:class:`~mdeq.tasks.classification.ClassificationTask`.

Both take ``--percent`` (the fraction of the training set, PERCENT). ``test`` evaluates a
checkpoint (ours or the original's ``.pkl``) on the held-out set and writes
``valid_results.json`` to the output folder; with ``--exit-sweep``, it evaluates the checkpoint at
each evaluation setting (budget and per-sample exit rule) and names the one that reaches the best
held-out top-1 at the fewest evaluations of f per image (``exit_sweep.json``).
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch.nn as nn
from torch.utils.data import DataLoader

from ..analysis.sweep import choose_setting, format_exit_table, parse_exit_settings, run_exit_sweep
from ..core.checkpoint_manager import model_files
from ..modules.early_exit import ExitSetting
from ..core.state import make_loader
from ..datasets import build_cls_val_dataset
from ..tasks.classification import ClassificationTask, check_classes, validate
from ..utils.checkpoint import load_weights
from ..config import ConfigError
from ..models import forward_kind
from ..models.inference import evaluation_model
from ..utils.distributed import DistInfo, unwrap
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
        if test:
            parser.add_argument("--exit-sweep", dest="exit_sweep", default="",
                                help="evaluate at each evaluation setting RULE[:PARAM][@BUDGET], comma-separated "
                                     "(e.g. none@4,residual:0.01@10,prediction:2@10,margin:0.9@10) and name the one "
                                     "with the best held-out top-1 at the fewest mean evaluations of f; run it on "
                                     "DATASET.TEST_SET val")
            parser.add_argument("--exit-sweep-slack", dest="exit_sweep_slack", type=float, default=0.0,
                                help="--exit-sweep: choose among the settings within this many top-1 points of "
                                     "the best (default 0: the best only)")

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
        evaluated = evaluation_model(model, cfg)
        if getattr(args, "exit_sweep", ""):
            return self.exit_sweep(evaluated, path, args, cfg, info, out_dir)
        summary = task.summary(model, cfg)      # of the model as trained (the copy's folded layers count otherwise)
        loader = self.test_loader(cfg, info)
        t0 = time.time()
        res = validate(evaluated, loader, cfg, info.device, is_main=info.is_main)
        res.update(model_file=path, time_s=time.time() - t0, **summary)
        logger.info("held-out (%s, %d images): top-1 %.2f%%, top-5 %.2f%%, loss %.4f, %s", cfg.DATASET.DATASET,
                    res["num_samples"], res["top1"], res["top5"], res["loss"], _solver_figures(res))
        if info.is_main:
            write_json(os.path.join(out_dir, "valid_results.json"), res, indent=2)
        return res


    def exit_sweep(self, model: nn.Module, path: str, args: argparse.Namespace, cfg, info: DistInfo, out_dir: str
                   ) -> Dict[str, Any]:
        """``--exit-sweep``: the held-out set at every setting; the table, the chosen setting and its config
        keys go to the log, the rows to ``exit_sweep.json``. Returns ``{'rows': [...], 'chosen': {...}}``."""
        net = unwrap(model)
        if forward_kind(net) != "equilibrium":
            raise ConfigError(f"--exit-sweep varies the forward solve: MODEL.NAME {cfg.MODEL.NAME!r} has no "
                              f"equilibrium ({forward_kind(net)} network)")
        settings = parse_exit_settings(args.exit_sweep, ExitSetting.from_config(cfg))
        if cfg.DATASET.TEST_SET != "val":
            logger.warning("--exit-sweep on DATASET.TEST_SET %r: choose the setting on the validation split "
                           "(DATASET.TEST_SET val), then evaluate the test set once with it", cfg.DATASET.TEST_SET)
        loader = self.test_loader(cfg, info)

        def evaluate(setting: ExitSetting) -> Dict[str, float]:
            net.set_exit(setting)
            return validate(model, loader, cfg, info.device, is_main=info.is_main)

        rows = run_exit_sweep(evaluate, settings)
        net.set_exit(ExitSetting.from_config(cfg))
        chosen = choose_setting(rows, float(args.exit_sweep_slack))
        keys = " ".join(f"{k} {v}" for k, v in settings[rows.index(chosen)].config_items().items())
        logger.info("evaluation settings on %s (%s, %d images):\n%s\nchosen: %s (top-1 %.2f%%, %.2f f evaluations "
                    "per image, p90 %.0f); config: %s", cfg.DATASET.TEST_SET, cfg.DATASET.DATASET,
                    len(loader.dataset), format_exit_table(rows, chosen), chosen.setting, chosen.top1,
                    chosen.f_evals_mean, chosen.f_evals_p90, keys)
        out = {"model_file": path, "test_set": cfg.DATASET.TEST_SET, "rows": [r.as_dict() for r in rows],
               "chosen": chosen.as_dict(), "config": settings[rows.index(chosen)].config_items()}
        if info.is_main:
            write_json(os.path.join(out_dir, "exit_sweep.json"), out, indent=2)
        return out


def _solver_figures(res: Dict[str, Any]) -> str:
    """The forward solve of an evaluation in words, by what the model computes (``res['forward']``)."""
    if res.get("forward") == "explicit":
        return "explicit network (no equilibrium, no solver)"
    if res.get("forward") == "unrolled":
        return f"unrolled weight-tied stack of depth {res.get('unrolled_depth')} (no equilibrium, no residual)"
    return (f"mean f steps {res.get('f_steps', float('nan')):.2f}, f evaluations per image mean "
            f"{res.get('f_evals_mean', float('nan')):.2f} p90 {res.get('f_evals_p90', float('nan')):.0f}, "
            f"{res.get('images_per_s', float('nan')):.1f} images/s, final residual rel "
            f"{res.get('f_rel', float('nan')):.3g} abs {res.get('f_abs', float('nan')):.3g}")


PROGRAM = ClassificationProgram()


def train(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_train.py``: train, checkpoint every epoch, evaluate; returns the final metrics."""
    return run_train(PROGRAM, argv)


def test(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_valid.py``: evaluate a checkpoint on the held-out set (or sweep the forward
    budget); returns the metrics."""
    return run_test(PROGRAM, argv)
