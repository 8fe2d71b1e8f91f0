"""Training and validation loops for MDEQ image classification.

The model is called as ``model(x, train_step=global_step)``: for ``global_step <
TRAIN.PRETRAIN_STEPS`` it runs the unrolled weight-tied warm-up, afterwards the equilibrium
solver with the implicit backward. Solver statistics (``model.solver_stats``: forward / backward
steps and residuals) are averaged, shown in the progress bar and written to TensorBoard.

A step whose loss or gradient is not finite, or whose forward solver hit its divergence guard
(``solver_stats['f_diverged']``), is skipped (no parameter update), logged with the solver's
statistics, and counted (:class:`mdeq.core.checkpointing.StepGuard`); ``TRAIN.MAX_BAD_STEPS``
consecutive skipped steps stop the run with a :class:`TrainingDiverged` error. Skipped steps still
advance the global step and the LR schedule, so the schedule stays tied to the number of batches
seen (and to exact resumption).

A stop signal (:class:`mdeq.core.checkpointing.GracefulStop`) ends the epoch at the next step
boundary with ``state.interrupted`` set and ``state.batch_in_epoch`` the batches consumed, which is
where a resumed run starts (``start_batch``).
"""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Optional

import torch
import torch.nn as nn
from tqdm import tqdm

from ..utils.distributed import all_reduce_sum
from .checkpointing import (GracefulStop, StepGuard, TrainingDiverged, TrainState, format_solver_stats,
                            grad_norm_of, unwrap)
from .metrics import AverageMeter, topk_correct
from .regularization import JacobianRegularizer

logger = logging.getLogger(__name__)

SOLVER_KEYS = ("f_steps", "f_abs", "f_rel", "b_steps", "b_abs", "b_rel", "jac_loss")

__all__ = ["TrainState", "TrainingDiverged", "train_one_epoch", "validate", "unwrap", "SOLVER_KEYS"]


def _stats(model: nn.Module) -> Dict[str, Any]:
    return dict(getattr(unwrap(model), "solver_stats", {}) or {})


def _num(v: Any) -> Optional[float]:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().mean().item() if v.numel() else None
    if isinstance(v, bool) or v is None:
        return None if v is None else float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


_fmt_stats = format_solver_stats


def _use_amp(cfg, device: torch.device) -> bool:
    return bool(cfg.TRAIN.AMP) and device.type == "cuda"


def train_one_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, epoch: int, state: TrainState, cfg, device: torch.device,
                    writer: Any = None, scaler: Optional[torch.amp.GradScaler] = None,
                    is_main: bool = True, start_batch: int = 0,
                    stopper: Optional[GracefulStop] = None) -> Dict[str, float]:
    """One pass over ``loader``; returns the epoch's averages (reduced over processes).

    Args:
        model: the (possibly DDP-wrapped) classification MDEQ, in train mode on return.
        scheduler: stepped after every batch (see :mod:`mdeq.utils.optim`); may be None.
        state: updated in place (global step, bad-step counters, ``batch_in_epoch``, ``stop`` when
            TRAIN.MAX_ITERS is hit, ``interrupted`` when ``stopper`` asked to stop).
        writer: a tensorboardX ``SummaryWriter`` (rank 0) or None.
        scaler: a GradScaler when AMP runs (CUDA and TRAIN.AMP).
        start_batch: the index of the loader's first batch within the epoch (a resumed epoch; the
            loader already skips the batches before it).
        stopper: checked after every step; when it asks to stop, the epoch ends there.

    Raises:
        TrainingDiverged: TRAIN.MAX_BAD_STEPS consecutive steps were skipped.
    """
    model.train()
    amp = _use_amp(cfg, device)
    guard = StepGuard(state, cfg.TRAIN.MAX_BAD_STEPS)
    reg = JacobianRegularizer.from_cfg(cfg)
    meters = {k: AverageMeter(k) for k in ("loss", "top1", "top5", "batch_time") + SOLVER_KEYS}
    correct1 = correct5 = seen = 0
    loss_sum = 0.0
    max_iters = cfg.TRAIN.MAX_ITERS
    print_freq = max(1, cfg.PRINT_FREQ)
    total = start_batch + len(loader) if hasattr(loader, "__len__") else None  # type: ignore[arg-type]
    state.batch_in_epoch = start_batch
    bar = tqdm(loader, total=None if total is None else total - start_batch, desc=f"train {epoch}",
               disable=not is_main, leave=False, dynamic_ncols=True)
    end = time.time()
    for i, (images, target) in enumerate(bar, start=start_batch):
        if 0 <= max_iters <= state.global_step:
            state.stop = True
            break
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        step = state.global_step
        warmup = 0 <= step < cfg.TRAIN.PRETRAIN_STEPS
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            logits = model(images, train_step=step, jac_loss=reg.active(step))
            loss = criterion(logits.float(), target)
        loss = reg.add(loss, model, epoch)
        stats = _stats(model)
        bad_reason = guard.forward_problem(loss, stats)
        grad_norm = None
        if bad_reason is None:
            if scaler is not None and amp:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            grad_norm = grad_norm_of(model, cfg.TRAIN.CLIP)
            if not (scaler is not None and amp):  # with AMP, the scaler skips such steps itself
                bad_reason = guard.gradient_problem(grad_norm)
            stats = _stats(model)
        if bad_reason is None:
            if scaler is not None and amp:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            guard.good()
        else:
            optimizer.zero_grad(set_to_none=True)
            guard.bad(bad_reason, epoch, step, loss, grad_norm, stats, "warm-up" if warmup else "equilibrium")
        if scheduler is not None:
            scheduler.step()
        state.global_step += 1
        state.batch_in_epoch = i + 1

        n = target.shape[0]
        c1, c5 = topk_correct(logits.detach().float(), target, (1, 5))
        if bad_reason is None:
            meters["loss"].update(loss.item(), n)
            loss_sum += loss.item() * n
        correct1, correct5, seen = correct1 + c1, correct5 + c5, seen + n
        meters["top1"].update(100.0 * c1 / n, n)
        meters["top5"].update(100.0 * c5 / n, n)
        for k in SOLVER_KEYS:
            v = _num(stats.get(k))
            if v is not None:
                meters[k].update(v)
        meters["batch_time"].update(time.time() - end)
        end = time.time()
        lr = optimizer.param_groups[0]["lr"]
        if is_main:
            post = {"loss": f"{meters['loss'].avg:.3f}", "acc": f"{meters['top1'].avg:.1f}",
                    "f": f"{meters['f_steps'].val:.0f}", "lr": f"{lr:.2e}"}
            if meters["b_steps"].count:
                post["b"] = f"{meters['b_steps'].val:.0f}"
            if meters["jac_loss"].count:
                post["jac"] = f"{meters['jac_loss'].val:.3g}"
            bar.set_postfix(post, refresh=False)
        if writer is not None and (step % print_freq == 0 or i == (total or 0) - 1):
            writer.add_scalar("train/loss", loss.item() if bad_reason is None else float("nan"), step)
            writer.add_scalar("train/top1", 100.0 * c1 / n, step)
            writer.add_scalar("train/lr", lr, step)
            writer.add_scalar("train/phase", 0 if warmup else 1, step)
            if grad_norm is not None:
                writer.add_scalar("train/grad_norm", grad_norm, step)
            for k in SOLVER_KEYS:
                v = _num(stats.get(k))
                if v is not None:
                    writer.add_scalar(f"solver/{k}", v, step)
        if is_main and step % print_freq == 0:
            logger.info("epoch %d [%d/%s] step %d loss %.6f top1 %.2f lr %.4g %s", epoch, i, total, step,
                        loss.item(), 100.0 * c1 / n, lr, _fmt_stats(stats))
        if stopper is not None and stopper.should_stop():
            state.interrupted = True
            break
    bar.close()

    # exact epoch averages over all processes
    good = meters["loss"].count
    tot_loss, tot_good = all_reduce_sum(loss_sum), all_reduce_sum(float(good))
    tot_c1, tot_c5, tot_n = all_reduce_sum(float(correct1)), all_reduce_sum(float(correct5)), all_reduce_sum(float(seen))
    result = {
        "loss": tot_loss / tot_good if tot_good else float("nan"),
        "top1": 100.0 * tot_c1 / tot_n if tot_n else 0.0,
        "top5": 100.0 * tot_c5 / tot_n if tot_n else 0.0,
        "lr": optimizer.param_groups[0]["lr"],
        "global_step": state.global_step,
        "batch_time": meters["batch_time"].avg,
    }
    for k in SOLVER_KEYS:
        if meters[k].count:
            result[k] = meters[k].avg
    if writer is not None:
        writer.add_scalar("train_epoch/loss", result["loss"], epoch)
        writer.add_scalar("train_epoch/top1", result["top1"], epoch)
    return result


@torch.no_grad()
def validate(model: nn.Module, loader: Iterable, criterion: nn.Module, cfg, device: torch.device,
             writer: Any = None, step: int = 0, is_main: bool = True, train_step: int = -1,
             f_thres: Optional[int] = None, desc: str = "valid") -> Dict[str, float]:
    """Evaluate on ``loader`` (each process its shard); returns loss, top1, top5 and solver stats.

    ``train_step=-1`` (default) evaluates at the equilibrium; a value in ``[0, PRETRAIN_STEPS)``
    evaluates the unrolled warm-up network. Sums are reduced over processes, so with
    :class:`mdeq.utils.distributed.ShardSampler` the numbers are exact for the whole set.
    """
    net = unwrap(model)
    net.eval()
    amp = _use_amp(cfg, device)
    loss_sum = c1_sum = c5_sum = n_sum = 0.0
    solver = {k: AverageMeter(k) for k in ("f_steps", "f_abs", "f_rel", "spectral_radius")}
    bar = tqdm(loader, desc=desc, disable=not is_main, leave=False, dynamic_ncols=True)
    for images, target in bar:
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=amp):
            logits = net(images, train_step=train_step, f_thres=f_thres)
        logits = logits.float()
        n = target.shape[0]
        loss_sum += criterion(logits, target).item() * n
        c1, c5 = topk_correct(logits, target, (1, 5))
        c1_sum, c5_sum, n_sum = c1_sum + c1, c5_sum + c5, n_sum + n
        stats = _stats(net)
        for k in solver:
            v = _num(stats.get(k))
            if v is not None:
                solver[k].update(v, n)
        if is_main:
            bar.set_postfix({"acc": f"{100.0 * c1_sum / max(1, n_sum):.1f}", "f": f"{solver['f_steps'].avg:.1f}"},
                            refresh=False)
    bar.close()
    tot = {k: all_reduce_sum(v) for k, v in (("loss", loss_sum), ("c1", c1_sum), ("c5", c5_sum), ("n", n_sum))}
    n = tot["n"]
    result = {"loss": tot["loss"] / n if n else float("nan"), "top1": 100.0 * tot["c1"] / n if n else 0.0,
              "top5": 100.0 * tot["c5"] / n if n else 0.0, "num_samples": int(n)}
    for k, m in solver.items():
        s, c = all_reduce_sum(m.sum), all_reduce_sum(float(m.count))
        if c:
            result[k] = s / c
    if "spectral_radius" in result and is_main:
        logger.info("%s: spectral radius of J_f(z*) (power-method estimate) %.4f", desc, result["spectral_radius"])
    if writer is not None:
        for k in ("loss", "top1", "top5", "f_steps", "f_rel", "spectral_radius"):
            if k in result:
                writer.add_scalar(f"{desc}/{k}", result[k], step)
    return result
