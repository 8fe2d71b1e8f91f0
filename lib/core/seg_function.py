"""Segmentation training and evaluation loops (single process or DistributedDataParallel).

* :func:`train_one_epoch` — one pass over the training loader: warm-up (unrolled) steps while
  the global step is below ``TRAIN.PRETRAIN_STEPS``, equilibrium steps after; a step whose loss is
  not finite on any rank is skipped by every rank (the ranks agree, so DDP stays in step), and
  ``TRAIN.MAX_BAD_STEPS`` consecutive skipped steps stop the run with :class:`TrainingDiverged`.
* :func:`evaluate` — full-resolution evaluation: confusion matrix summed over the ranks, per-class
  IoU, mIoU, pixel accuracy (conventions of the official Cityscapes evaluation, see
  :mod:`mdeq.core.seg_metrics`) and the mean number of forward solver steps; optional flip and
  multi-scale testing; an optional callback receives every prediction (to write pictures).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..utils.distributed import all_reduce_sum
from .criterion import resize_logits
from .seg_metrics import confusion_matrix, scores_from_confusion

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


@dataclass
class TrainState:
    """What the loop carries across epochs (and checkpoints): optimizer steps taken, the current
    run of skipped steps."""

    global_step: int = 0
    bad_steps: int = 0


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _scalar(v) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, Tensor):
        v = v.float().mean().item()
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def solver_scalars(stats: Dict) -> Dict[str, float]:
    """The numeric solver statistics worth logging (``f_steps``, ``f_rel``, ``b_steps``, ...)."""
    out = {}
    for key in ("f_steps", "f_abs", "f_rel", "b_steps", "b_abs", "b_rel", "b_fallback"):
        v = _scalar(stats.get(key))
        if v is not None:
            out[key] = v
    return out


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, cfg, device: torch.device, state: TrainState, scheduler=None,
                    scheduler_per_iter: bool = False, scaler=None, writer=None, rank: int = 0,
                    max_iters: int = -1) -> Dict[str, float]:
    """Train for one epoch (or until ``state.global_step`` reaches ``max_iters`` >= 0).

    ``scheduler`` is stepped after every optimizer step when ``scheduler_per_iter`` (else the
    caller steps it per epoch). Returns the mean loss and the counts of steps taken and skipped.
    """
    model.train()
    net = _unwrap(model)
    if cfg.MODEL.SOFTPLUS_WARMUP and hasattr(net, "set_softplus"):
        net.set_softplus(epoch < cfg.TRAIN.SOFTPLUS_EPOCHS)
    pretrain_steps = cfg.TRAIN.PRETRAIN_STEPS
    print_freq = max(1, cfg.PRINT_FREQ)
    amp = scaler is not None
    loss_sum, n_steps, n_skipped = 0.0, 0, 0
    start = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True, leave=False)
    for i, (images, labels, _) in enumerate(bar):
        if 0 <= max_iters <= state.global_step:
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        step = state.global_step
        with torch.autocast(device_type=device.type, enabled=amp):
            logits = model(images, train_step=step)
            loss = criterion(logits.float(), labels)
        finite = torch.isfinite(loss.detach()).float()
        if _dist_on():  # every rank must take the same branch, or DDP's all-reduce would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        optimizer.zero_grad(set_to_none=True)
        if finite.item() < 1.0:
            n_skipped += 1
            state.bad_steps += 1
            logger.warning("epoch %d iter %d (step %d): non-finite loss %s on some rank, step skipped "
                           "(%d in a row, limit TRAIN.MAX_BAD_STEPS = %d)", epoch, i, step, loss.item(),
                           state.bad_steps, cfg.TRAIN.MAX_BAD_STEPS)
            if _dist_on():  # a zero gradient through every parameter keeps DDP's reducer in step
                zero = sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
                zero.backward()
                optimizer.zero_grad(set_to_none=True)
            if state.bad_steps >= cfg.TRAIN.MAX_BAD_STEPS:
                raise TrainingDiverged(f"{state.bad_steps} consecutive steps with a non-finite loss "
                                       f"(epoch {epoch}, step {step}); stopping (TRAIN.MAX_BAD_STEPS)")
            continue
        state.bad_steps = 0
        lr = optimizer.param_groups[0]["lr"]  # the rate of this step, before the scheduler moves it
        if amp:
            scaler.scale(loss).backward()
            if cfg.TRAIN.CLIP > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.TRAIN.CLIP > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.TRAIN.CLIP)
            optimizer.step()
        if scheduler is not None and scheduler_per_iter:
            scheduler.step()
        state.global_step += 1
        n_steps += 1
        loss_value = loss.item()
        loss_sum += loss_value
        stats = solver_scalars(net.solver_stats)
        if rank == 0:
            bar.set_postfix(loss=f"{loss_value:.4f}", mode=net.solver_stats.get("mode", "?"),
                            f=stats.get("f_steps", 0))
            if writer is not None:
                writer.add_scalar("train/loss", loss_value, state.global_step)
                writer.add_scalar("train/lr", lr, state.global_step)
                writer.add_scalar("train/equilibrium", float(step >= pretrain_steps), state.global_step)
                for k, v in stats.items():
                    writer.add_scalar(f"solver/{k}", v, state.global_step)
            if i % print_freq == 0:
                extra = " ".join(f"{k}={v:.4g}" for k, v in stats.items())
                logger.info("epoch %d iter %d/%d step %d: loss %.4f lr %.3g mode %s %s (%.2fs/iter)", epoch, i,
                            len(loader), step, loss_value, lr, net.solver_stats.get("mode", "?"), extra,
                            (time.time() - start) / (i + 1))
    bar.close()
    mean_loss = loss_sum / max(n_steps, 1)
    totals = torch.tensor([loss_sum, float(n_steps)], dtype=torch.float64, device=device)
    totals = all_reduce_sum(totals)
    if totals[1] > 0:
        mean_loss = float(totals[0] / totals[1])
    return {"loss": mean_loss, "steps": n_steps, "skipped": n_skipped}


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, size: Sequence[int], scales: Sequence[float] = (1.0,),
            flip: bool = False) -> Tensor:
    """Class probabilities (N, C, H, W) at ``size`` (H, W), averaged over the ``scales`` (the image
    resized bilinearly) and, with ``flip``, the horizontally flipped image. Also returns nothing
    else: the solver statistics of the last forward stay in ``model.solver_stats``."""
    probs = None
    h, w = images.shape[-2:]
    views = 0
    for s in scales:
        x = images if s == 1.0 else F.interpolate(images, size=(max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))),
                                                    mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            xi = x.flip(-1) if flipped else x
            logits = model(xi, train_step=-1)
            if flipped:
                logits = logits.flip(-1)
            p = F.softmax(resize_logits(logits.float(), size), dim=1)
            probs = p if probs is None else probs + p
            views += 1
    return probs / views


@torch.no_grad()
def evaluate(model: nn.Module, loader, num_classes: int, device: torch.device, ignore_label: int = 255,
             scales: Sequence[float] = (1.0,), flip: bool = False, rank: int = 0,
             class_names: Optional[Sequence[str]] = None,
             on_prediction: Optional[Callable[[np.ndarray, str], None]] = None) -> Dict:
    """Evaluate on ``loader`` (image, label, name batches; labels at full resolution).

    Returns the scores of :func:`mdeq.core.seg_metrics.scores_from_confusion` plus
    ``confusion`` (list of lists), ``mean_f_steps`` (forward solver steps per image, averaged
    over the images of every rank) and ``images``. ``on_prediction(pred, name)`` gets each
    predicted train-id map (H, W) uint8 on the rank that computed it.
    """
    model.eval()
    net = _unwrap(model)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    steps = torch.zeros(3, dtype=torch.float64, device=device)  # sum of f_steps * images, those images, all images
    for images, labels, names in tqdm(loader, desc="eval", disable=rank != 0, dynamic_ncols=True, leave=False):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        probs = predict(model, images, labels.shape[-2:], scales, flip)
        pred = probs.argmax(dim=1)
        conf += confusion_matrix(pred, labels, num_classes, ignore_label)
        f_steps = _scalar(net.solver_stats.get("f_steps"))
        if f_steps is not None:
            steps[0] += f_steps * images.shape[0]
            steps[1] += images.shape[0]
        steps[2] += images.shape[0]
        if on_prediction is not None:
            pred_np = pred.to(torch.uint8).cpu().numpy()
            for p, name in zip(pred_np, names):
                on_prediction(p, name)
    conf = all_reduce_sum(conf)
    steps = all_reduce_sum(steps)
    scores = scores_from_confusion(conf, class_names)
    scores["confusion"] = conf.cpu().tolist()
    scores["mean_f_steps"] = float(steps[0] / steps[1]) if steps[1] > 0 else float("nan")
    scores["images"] = int(steps[2])
    return scores


def format_scores(scores: Dict) -> str:
    """A readable table of per-class IoU and the summary numbers."""
    lines = [f"{'class':<16} IoU"]
    for name, v in scores["iou_per_class"].items():
        lines.append(f"{name:<16} {'  n/a' if math.isnan(v) else f'{v:.4f}'}")
    lines.append(f"mIoU {scores['miou']:.4f}  pixel acc {scores['pixel_acc']:.4f}  "
                 f"mean class acc {scores['mean_class_acc']:.4f}  mean solver steps {scores['mean_f_steps']:.2f}")
    return "\n".join(lines)
