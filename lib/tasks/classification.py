"""Image classification (CIFAR-10, ImageNet, the embedded digits): the task the engine
(:mod:`mdeq.core.trainer`) trains, its held-out evaluation, and the programs ``tools/cls_train.py``
and ``tools/cls_valid.py``.

Training writes the files of :mod:`mdeq.core.checkpoint_manager` to ``OUTPUT_DIR/<dataset>/<cfg
stem>/``; the best metric is the held-out top-1 (``model_best.pth.tar``). Evaluation writes
``valid_results.json`` there.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..datasets import build_cls_datasets, build_cls_val_dataset
from ..models import count_parameters, get_cls_net
from ..utils.checkpoint import load_weights
from ..utils.distributed import DistInfo, all_reduce_sum, process_group_closed, unwrap
from ..utils.logger import progress_bar
from ..core.checkpoint_manager import model_files
from ..programs.launch import base_parser, config_from_args, setup_process
from ..programs.launch import parse_args as parse_launch_args
from ..core.metrics import topk_correct
from ..core.state import make_loader
from ..programs.sweep import add_sweep_option, sweep_checkpoints
from ..core.trainer import STOPPED_TOGETHER, Task, autocast_dtype, fit

logger = logging.getLogger(__name__)

#: the model's statistics that an evaluation averages (spectral_radius with MODEL.SPECTRAL_RADIUS_ITERS > 0)
EVAL_KEYS = ("f_steps", "f_abs", "f_rel", "spectral_radius")


def f_flops(model: nn.Module, image_size: Sequence[int]) -> Optional[int]:
    """FLOPs of one evaluation of f_theta for one image (None if they cannot be counted).

    Convolutions are the only matrix products in f, so they are counted from forward hooks:
    2 * output elements * (C_in / groups * kh * kw) each, what ``torch.utils.flop_counter`` counts,
    without its first-use cost (about a second, in every run's wall time).
    """
    from ..modules import WeightNormConv2d
    net = unwrap(model)
    total = [0]

    def count(mod: nn.Module, inputs, out: torch.Tensor) -> None:
        weight = mod.weight_v if isinstance(mod, WeightNormConv2d) else mod.weight
        total[0] += 2 * out.numel() * weight[0].numel()

    hooks = [m.register_forward_hook(count) for m in net.fullstage.modules()
             if isinstance(m, (nn.Conv2d, WeightNormConv2d))]
    was_training = net.training
    net.eval()
    try:
        p = next(net.parameters())
        x = torch.zeros(1, net.downsample[0].in_channels, int(image_size[1]), int(image_size[0]), device=p.device, dtype=p.dtype)
        with torch.no_grad():
            inj = net.injection(x)
            net.fullstage([inj.new_zeros(1, *s) for s in net.state_shapes(inj)], inj)
        return total[0]
    except Exception as e:  # the summary is informative only
        logger.debug("FLOP count skipped: %s", e)
        return None
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)


def _check_classes(ds: Dataset, cfg) -> None:
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
    ``model_kwargs`` go to the model call (``f_thres=...``; default: the equilibrium)."""
    net = unwrap(model)
    net.eval()
    amp_dtype = autocast_dtype(bool(cfg.TRAIN.AMP), device)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    # loss, top-1, top-5, images; then per EVAL_KEYS entry: its sum x images, the images that reported it
    sums = torch.zeros(4 + 2 * len(EVAL_KEYS), dtype=torch.float64)
    bar = progress_bar(loader, enabled=is_main, desc="valid")
    for images, target in bar:
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits, info = net(images, return_info=True, **model_kwargs)
            logits = logits.float()
        n = target.shape[0]
        c1, c5 = topk_correct(logits, target, (1, 5))
        row = [criterion(logits, target).item(), c1, c5, n]
        for k in EVAL_KEYS:
            v = info.get(k)
            row += [v * n, n] if v is not None else [0.0, 0]
        sums += torch.tensor(row, dtype=torch.float64)
        bar.set_postfix({"acc": f"{100.0 * float(sums[1]) / max(1.0, float(sums[3])):.1f}"}, refresh=False)
    tot = all_reduce_sum(sums).tolist()  # one collective for every sum
    loss, c1, c5, n = tot[:4]
    result = {"loss": loss / n if n else float("nan"), "top1": 100.0 * c1 / n if n else 0.0,
              "top5": 100.0 * c5 / n if n else 0.0, "num_samples": int(n)}
    for j, k in enumerate(EVAL_KEYS):
        s, c = tot[4 + 2 * j], tot[5 + 2 * j]
        if c:
            result[k] = s / c
    return result


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
        _check_classes(val_set, cfg)
        return train_set, val_set

    def build_criterion(self, cfg) -> nn.Module:
        return nn.CrossEntropyLoss()

    def batch_metrics(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        c1, c5 = topk_correct(output, target, (1, 5))
        return {"top1": 100.0 * c1, "top5": 100.0 * c5}

    def evaluate(self, model: nn.Module, loader: DataLoader, cfg, info: DistInfo) -> Dict[str, Any]:
        return validate(model, loader, cfg, info.device, is_main=info.is_main)

    def describe(self, result: Dict[str, Any]) -> str:
        rho = f", spectral radius {result['spectral_radius']:.3f}" if "spectral_radius" in result else ""
        return (f"held-out loss {result['loss']:.4f} top-1 {result['top1']:.2f}% top-5 {result['top5']:.2f}% "
                f"({result['num_samples']} images, f steps {result.get('f_steps', float('nan')):.1f}, "
                f"rel residual {result.get('f_rel', float('nan')):.3g}{rho})")

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
        """Parameter count and FLOPs of one f evaluation (logged)."""
        n = count_parameters(unwrap(model))
        size = list(cfg.MODEL.IMAGE_SIZE) if len(cfg.MODEL.IMAGE_SIZE) == 2 else [32, 32]
        flops = f_flops(model, size)
        logger.info("model: %s, %s trainable parameters; one f evaluation: %s (input %dx%d)",
                    type(unwrap(model)).__name__, f"{n:,}", "n/a" if flops is None else f"{flops / 1e6:.1f} MFLOPs",
                    size[0], size[1])
        return {"parameters": n, "f_flops": flops}


# ---------------------------------------------------------------------------------------- programs
def parse_args(argv: Optional[Sequence[str]] = None, description: str = "", sweep: bool = False
               ) -> argparse.Namespace:
    """The options of the original MDEQ scripts (:func:`mdeq.programs.launch.base_parser`) and ``--percent``;
    with ``sweep`` (cls_valid) also ``--f-thres-sweep``."""
    p = base_parser(description)
    p.add_argument("--percent", type=float, default=1.0, help="fraction of the training set (PERCENT)")
    if sweep:
        add_sweep_option(p)
    return parse_launch_args(p, argv)


def _setup(args: argparse.Namespace, phase: str):
    cfg = config_from_args(args, ["PERCENT", float(args.percent)] if args.percent != 1.0 else [])
    info, out_dir, tb_dir = setup_process(cfg, args.cfg, phase, args.local_rank)
    logger.info("overrides: %s", " ".join(map(str, args.opts)) or "none")
    return cfg, info, out_dir, tb_dir


def train(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_train.py``: train, checkpoint every epoch, evaluate; returns the final metrics."""
    cfg, info, out_dir, tb_dir = _setup(parse_args(argv, "Train an MDEQ image classifier"), "train")
    with process_group_closed(together=STOPPED_TOGETHER):
        return fit(ClassificationTask(), cfg, info, out_dir, tb_dir)


def valid(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_valid.py``: evaluate a checkpoint on the held-out set; returns the metrics."""
    args = parse_args(argv, "Evaluate an MDEQ image classifier", sweep=True)
    cfg, info, out_dir, _ = _setup(args, "valid")
    with process_group_closed():
        task = ClassificationTask()
        model = task.build_model(cfg, initial_weights=False).to(info.device)
        if args.f_thres_sweep:
            loader = make_loader(build_cls_val_dataset(cfg), cfg, info, train=False)
            return sweep_checkpoints(
                cfg, out_dir, args.f_thres_sweep, lambda p: load_weights(model, p), "top1", "held-out top-1 (%)",
                lambda t: validate(model, loader, cfg, info.device, is_main=info.is_main, f_thres=t), info.is_main)
        [path] = model_files(cfg, out_dir)
        load_weights(model, path)
        logger.info("weights: %s", path)
        summary = task.summary(model, cfg)
        val_set = build_cls_val_dataset(cfg)
        _check_classes(val_set, cfg)
        t0 = time.time()
        res = validate(model, make_loader(val_set, cfg, info, train=False), cfg, info.device, is_main=info.is_main)
        res.update(model_file=path, time_s=time.time() - t0, **summary)
        logger.info("held-out (%s, %d images): top-1 %.2f%%, top-5 %.2f%%, loss %.4f, mean f steps %.2f, "
                    "final residual rel %.3g abs %.3g", cfg.DATASET.DATASET, res["num_samples"], res["top1"],
                    res["top5"], res["loss"], res.get("f_steps", float("nan")), res.get("f_rel", float("nan")),
                    res.get("f_abs", float("nan")))
        if info.is_main:
            with open(os.path.join(out_dir, "valid_results.json"), "w") as f:
                json.dump(res, f, indent=2)
        return res
