"""Segmentation training and evaluation loops (single process or DistributedDataParallel).

* :func:`train_one_epoch` — one pass over the training loader: warm-up (unrolled) steps while
  the global step is below ``TRAIN.PRETRAIN_STEPS``, equilibrium steps after; a step whose loss or
  gradient is not finite, or whose forward solver hit its divergence guard, on any rank is skipped
  by every rank (the ranks agree, so DDP stays in step; :class:`mdeq.core.checkpointing.StepGuard`),
  logged with the solver statistics, and ``TRAIN.MAX_BAD_STEPS`` consecutive skipped steps stop the
  run with :class:`TrainingDiverged`. Skipped steps do not advance the global step (it counts
  optimizer updates). A stop signal ends the epoch at the next step boundary (``state.interrupted``).
* :func:`evaluate` — full-resolution evaluation: confusion matrix summed over the ranks, per-class
  IoU, mIoU, pixel accuracy (conventions of the official Cityscapes evaluation, see
  :mod:`mdeq.core.seg_metrics`) and the mean number of forward solver steps; optional flip and
  multi-scale testing; an optional callback receives every prediction (to write pictures).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ..utils.distributed import all_reduce_sum
from .checkpointing import GracefulStop, StepGuard, TrainingDiverged, TrainState, grad_norm_of, unwrap
from .criterion import resize_logits
from .regularization import JacobianRegularizer
from .seg_metrics import confusion_matrix, scores_from_confusion

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


__all__ = ["TrainState", "TrainingDiverged", "train_one_epoch", "evaluate", "predict", "format_scores",
           "solver_scalars"]


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


_unwrap = unwrap


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
    for key in ("f_steps", "f_abs", "f_rel", "b_steps", "b_abs", "b_rel", "b_fallback", "jac_loss"):
        v = _scalar(stats.get(key))
        if v is not None:
            out[key] = v
    return out


def train_one_epoch(model: nn.Module, loader, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    epoch: int, cfg, device: torch.device, state: TrainState, scheduler=None,
                    scheduler_per_iter: bool = False, scaler=None, writer=None, rank: int = 0,
                    max_iters: int = -1, start_batch: int = 0,
                    stopper: Optional[GracefulStop] = None) -> Dict[str, float]:
    """Train for one epoch (or until ``state.global_step`` reaches ``max_iters`` >= 0).

    ``scheduler`` is stepped after every optimizer step when ``scheduler_per_iter`` (else the
    caller steps it per epoch). ``start_batch``: the index of the loader's first batch within the
    epoch (a resumed epoch). ``stopper`` is checked after every batch; when it asks to stop, the
    epoch ends there with ``state.interrupted`` set. Returns the mean loss and the counts of steps
    taken and skipped.

    Raises:
        TrainingDiverged: TRAIN.MAX_BAD_STEPS consecutive steps were skipped.
    """
    model.train()
    net = _unwrap(model)
    if cfg.MODEL.SOFTPLUS_WARMUP and hasattr(net, "set_softplus"):
        net.set_softplus(epoch < cfg.TRAIN.SOFTPLUS_EPOCHS)
    pretrain_steps = cfg.TRAIN.PRETRAIN_STEPS
    print_freq = max(1, cfg.PRINT_FREQ)
    amp = scaler is not None
    guard = StepGuard(state, cfg.TRAIN.MAX_BAD_STEPS)
    reg = JacobianRegularizer.from_cfg(cfg)
    loss_sum, n_steps, n_skipped = 0.0, 0, 0
    start = time.time()
    total = start_batch + len(loader)
    state.batch_in_epoch = start_batch
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=rank != 0, dynamic_ncols=True, leave=False)
    for i, (images, labels, _) in enumerate(bar, start=start_batch):
        if 0 <= max_iters <= state.global_step:
            state.stop = True
            break
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        step = state.global_step
        phase = "warm-up" if 0 <= step < pretrain_steps else "equilibrium"
        with torch.autocast(device_type=device.type, enabled=amp):
            logits = model(images, train_step=step, jac_loss=reg.active(step))
            loss = criterion(logits.float(), labels)
        loss = reg.add(loss, model, epoch)
        stats = dict(getattr(net, "solver_stats", {}) or {})
        optimizer.zero_grad(set_to_none=True)
        reason = guard.forward_problem(loss, stats)
        grad_norm = None
        if reason is not None:
            if _dist_on():  # a zero gradient through every parameter keeps DDP's reducer in step
                zero = sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
                zero.backward()
                optimizer.zero_grad(set_to_none=True)
        else:
            lr = optimizer.param_groups[0]["lr"]  # the rate of this step, before the scheduler moves it
            if amp:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = grad_norm_of(model, cfg.TRAIN.CLIP)  # the scaler skips non-finite steps itself
            else:
                loss.backward()
                grad_norm = grad_norm_of(model, cfg.TRAIN.CLIP)
                reason = guard.gradient_problem(grad_norm)
            stats = dict(getattr(net, "solver_stats", {}) or {})
        state.batch_in_epoch = i + 1
        if reason is not None:
            optimizer.zero_grad(set_to_none=True)
            n_skipped += 1
            guard.bad(reason, epoch, step, loss, grad_norm, stats, phase)
        else:
            guard.good()
            if amp:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if scheduler is not None and scheduler_per_iter:
                scheduler.step()
            state.global_step += 1
            n_steps += 1
            loss_value = loss.item()
            loss_sum += loss_value
            scalars = solver_scalars(stats)
            if rank == 0:
                bar.set_postfix(loss=f"{loss_value:.4f}", mode=stats.get("mode", "?"), f=scalars.get("f_steps", 0))
                if writer is not None:
                    writer.add_scalar("train/loss", loss_value, state.global_step)
                    writer.add_scalar("train/lr", lr, state.global_step)
                    writer.add_scalar("train/equilibrium", float(step >= pretrain_steps), state.global_step)
                    if grad_norm is not None:
                        writer.add_scalar("train/grad_norm", grad_norm, state.global_step)
                    for k, v in scalars.items():
                        writer.add_scalar(f"solver/{k}", v, state.global_step)
                if i % print_freq == 0:
                    extra = " ".join(f"{k}={v:.4g}" for k, v in scalars.items())
                    logger.info("epoch %d iter %d/%d step %d: loss %.6f lr %.3g mode %s %s (%.2fs/iter)", epoch,
                                i, total, step, loss_value, lr, stats.get("mode", "?"), extra,
                                (time.time() - start) / (i - start_batch + 1))
        if stopper is not None and stopper.should_stop():
            state.interrupted = True
            break
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
