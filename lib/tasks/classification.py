"""Image classification (CIFAR-10, ImageNet, the embedded digits): the task the engine
(:mod:`mdeq.core.trainer`) trains and its held-out evaluation (the programs:
:mod:`mdeq.programs.classification`).

Training writes the files of :mod:`mdeq.core.checkpoint_manager` to ``OUTPUT_DIR/<dataset>/<cfg
stem>/``; the best metric is the held-out top-1 (``model_best.pth.tar``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..datasets import build_cls_datasets, selection_on_test_set
from ..models import count_parameters, forward_kind, get_cls_net
from ..models.flops import f_flops, forward_flops
from ..utils.checkpoint import load_weights
from ..utils.distributed import DistInfo, unwrap
from ..utils.logger import progress_bar
from ..config import RANGES
from ..core.metrics import count_histogram, histogram_stats, topk_correct
from ..core.reduce import Reducer
from ..core.trainer import Task
from ..utils.precision import autocast_dtype

logger = logging.getLogger(__name__)

#: the model's statistics that an evaluation averages (spectral_radius with MODEL.SPECTRAL_RADIUS_ITERS > 0)
EVAL_KEYS = ("f_steps", "f_abs", "f_rel", "spectral_radius")
#: bins of the histogram of evaluations of f per image: every count of two solves (TEST.FLIP_TEST) of
#: the largest budget, a reversible solve's 2 per step + 1 included
EVAL_BINS = 2 * (2 * int(RANGES["MODEL.F_THRES"].high) + 1) + 1


def check_classes(ds: Dataset, cfg) -> None:
    """The dataset's classes (class folders of ImageNet, CIFAR's label names) against MODEL.NUM_CLASSES,
    when the dataset is built: a label beyond the model's outputs would stop training at its batch."""
    inner = getattr(ds, "dataset", ds)
    classes = getattr(inner, "classes", None)
    if classes and len(classes) != cfg.MODEL.NUM_CLASSES:
        where = f" in {os.path.abspath(inner.root)}" if isinstance(getattr(inner, "root", None), str) else ""
        raise ConfigError(f"MODEL.NUM_CLASSES = {cfg.MODEL.NUM_CLASSES} but DATASET.DATASET "
                          f"{cfg.DATASET.DATASET!r} has {len(classes)} classes{where}")


@torch.no_grad()
def validate(model: nn.Module, loader: DataLoader, cfg, device: torch.device, is_main: bool = True,
             **model_kwargs: Any) -> Dict[str, float]:
    """Held-out loss, top-1 / top-5 (%) and the forward solver's statistics, each rank its shard of
    ``loader`` (:class:`~mdeq.utils.distributed.ShardSampler`), sums reduced: exact for the whole set.
    ``model_kwargs`` go to the model call (``f_thres=...``; default: the equilibrium, at the evaluation
    setting TEST.F_THRES / TEST.EXIT_*). ``TEST.FLIP_TEST`` averages each image's logits with its
    horizontal mirror's (two forward passes).

    Besides the means of :data:`EVAL_KEYS`: ``f_evals_mean`` and ``f_evals_p90``, the mean and 90th
    percentile of the evaluations of f per image (both passes with FLIP_TEST; fewer than ``f_steps``
    where samples left the solve), and ``images_per_s`` (the whole loop, data loading included).
    """
    net = unwrap(model)
    flip = bool(cfg.TEST.FLIP_TEST)
    net.eval()
    amp_dtype = autocast_dtype(bool(cfg.TRAIN.AMP), device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # the solver statistics: means over the images that reported them; "counted": the images with a count of
    # f evaluations (none for an explicit network), "evals" the histogram of those counts
    reducer = Reducer(sums=("loss", "top1", "top5", "images", "counted"), means=EVAL_KEYS)
    reducer.add({"evals": torch.zeros(EVAL_BINS, dtype=torch.long)})    # every process reduces the same vector
    bar = progress_bar(loader, enabled=is_main, desc="valid")
    t0 = time.perf_counter()
    for images, target in bar:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, info = net(images, return_info=True, **model_kwargs)
            logits = logits.float()
            stats = {k: info.get(k) for k in EVAL_KEYS}
            evals = info.evaluations_per_sample(images.shape[0])
            if flip:
                # the mirror image's logits averaged in; its own equilibrium solve, its statistics averaged too
                mirrored, info = net(images.flip(-1), return_info=True, **model_kwargs)
                logits = 0.5 * (logits + mirrored.float())
                stats = {k: None if v is None else 0.5 * (v + info.get(k)) for k, v in stats.items()}
                mirror_evals = info.evaluations_per_sample(images.shape[0])
                evals = None if evals is None else evals + mirror_evals
        n = target.shape[0]
        c1, c5 = topk_correct(logits, target, (1, 5))
        counted = {} if evals is None else {"evals": count_histogram(evals, EVAL_BINS), "counted": n}
        reducer.add({"loss": criterion(logits, target).item(), "top1": c1, "top5": c5, "images": n, **counted},
                    stats, weight=n)
        bar.set_postfix({"acc": f"{100.0 * reducer.sums['top1'] / max(1.0, reducer.sums['images']):.1f}"},
                        refresh=False)
    elapsed = time.perf_counter() - t0
    tot = reducer.reduce(device)
    out = {"loss": tot.ratio("loss", "images"), "top1": tot.ratio("top1", "images", 100.0, empty=0.0),
           "top5": tot.ratio("top5", "images", 100.0, empty=0.0), "num_samples": int(tot.sums["images"]),
           "images_per_s": tot.sums["images"] / elapsed if elapsed > 0 else float("nan"), **tot.means}
    if tot.sums.get("counted", 0.0) > 0:     # an explicit network evaluates no f
        evals = histogram_stats(tot.sums["evals"], 0.9)
        out.update(f_evals_mean=evals["mean"], f_evals_p90=evals["quantile"])
    return out


class ClassificationTask(Task):
    """Cross-entropy on class labels; held-out top-1 / top-5."""

    name = "classification"
    best_metric = "top1"

    def build_model(self, cfg, initial_weights: bool) -> nn.Module:
        model = get_cls_net(cfg)
        if initial_weights and cfg.TRAIN.MODEL_FILE:
            load_weights(model, cfg.TRAIN.MODEL_FILE)
            logger.info("initialised from %s", cfg.TRAIN.MODEL_FILE)
        return model

    def build_datasets(self, cfg) -> Tuple[Dataset, Optional[Dataset]]:
        train_set, val_set = build_cls_datasets(cfg)
        check_classes(val_set, cfg)
        return train_set, val_set

    def selection_warning(self, cfg) -> Optional[str]:
        return selection_on_test_set(cfg)

    def build_criterion(self, cfg) -> nn.Module:
        # the training loss only: held-out losses stay the plain cross-entropy, comparable across runs
        return nn.CrossEntropyLoss(label_smoothing=float(cfg.LOSS.LABEL_SMOOTHING))

    def batch_metrics(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        c1, c5 = topk_correct(output, target, (1, 5))
        return {"top1": 100.0 * c1, "top5": 100.0 * c5}

    def evaluate(self, model: nn.Module, loader: DataLoader, cfg, info: DistInfo) -> Dict[str, Any]:
        return validate(model, loader, cfg, info.device, is_main=info.is_main)

    def describe(self, result: Dict[str, Any]) -> str:
        """The evaluation in words; the solver's figures only where a solver ran (an unrolled model
        reports its depth as its f steps and has no residual, an explicit one has neither)."""
        rho = f", spectral radius {result['spectral_radius']:.3f}" if "spectral_radius" in result else ""
        if "f_rel" in result:
            nan = float("nan")
            solver = (f", f steps {result.get('f_steps', nan):.1f}, f evaluations per image mean "
                      f"{result.get('f_evals_mean', nan):.2f} p90 {result.get('f_evals_p90', nan):.0f}, "
                      f"rel residual {result['f_rel']:.3g}{rho}")
        elif "f_steps" in result:
            solver = f", unrolled: {result['f_steps']:.0f} applications of f, no residual"
        else:
            solver = ", explicit network: no solver"
        return (f"held-out loss {result['loss']:.4f} top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                f"({result['num_samples']} images{solver})")

    def health_problem(self, cfg, train: Dict[str, float], val: Dict[str, Any]) -> Optional[str]:
        """Held-out top-1 at chance level (at most 1.5 / classes) while the training loss is no better
        than a uniform guess (0.9 ln classes or more): the model has stopped learning anything."""
        classes = int(cfg.MODEL.NUM_CLASSES)
        chance, uniform = 100.0 / classes, math.log(classes)
        if val and val["top1"] <= 1.5 * chance and train["loss"] >= 0.9 * uniform:
            return (f"held-out top-1 {val['top1']:.1f}% is at chance level ({chance:.1f}%) and the training loss "
                    f"{train['loss']:.4g} is no better than a uniform guess (ln {classes} = {uniform:.2f})")
        return None

    def summary(self, model: nn.Module, cfg) -> Dict[str, Any]:
        """MODEL.NAME, what the model computes (``forward``: 'equilibrium', 'unrolled' with its
        ``unrolled_depth``, or 'explicit'), parameter count and FLOPs (logged): of one f evaluation,
        or of a whole forward pass for an explicit network (``forward_flops``)."""
        net = unwrap(model)
        n, kind = count_parameters(net), forward_kind(net)
        size = list(cfg.MODEL.IMAGE_SIZE) if len(cfg.MODEL.IMAGE_SIZE) == 2 else [32, 32]
        out: Dict[str, Any] = {"model": cfg.MODEL.NAME, "forward": kind, "parameters": n}
        if kind == "explicit":
            flops, what = forward_flops(net, cfg.MODEL.IN_CHANNELS, size), "one forward pass"
            out["forward_flops"] = flops
        else:
            flops, what = f_flops(net, size), "one f evaluation"
            out["f_flops"] = flops
        if kind == "unrolled":
            out["unrolled_depth"] = int(net.depth)
            what += f" (unrolled: {net.depth} per forward pass, in training and evaluation)"
        logger.info("model: %s (MODEL.NAME %s), %s trainable parameters; %s: %s (input %dx%d)",
                    type(net).__name__, cfg.MODEL.NAME, f"{n:,}", what,
                    "n/a" if flops is None else f"{flops / 1e6:.1f} MFLOPs", size[0], size[1])
        return out
