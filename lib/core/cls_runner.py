"""The classification training and evaluation programs (``tools/cls_train.py``, ``tools/cls_valid.py``).

Training writes to ``OUTPUT_DIR/<dataset>/<cfg stem>/``:

* ``checkpoint.pth.tar`` after every epoch and when SIGTERM / SIGINT stops the run (mid-epoch, at a
  step boundary): model, optimizer, scheduler (and AMP scaler) states, ``epoch`` and
  ``batch_in_epoch`` (where to continue), ``global_step``, ``best_acc``, the config, every rank's RNG
  states and the sampler's seed (see :mod:`mdeq.core.checkpointing`); ``TRAIN.RESUME True``
  continues from it (or from ``TRAIN.CHECKPOINT``) exactly. ``checkpoint_ep{N:04d}.pth.tar``: the
  last ``TRAIN.KEEP_CHECKPOINTS`` epoch copies (when > 1).
* ``model_best.pth.tar`` (the weights with the best held-out top-1), ``final_state.pth`` (the final
  weights) and ``results.json`` (final held-out metrics, wall time).

Under ``torchrun`` every process trains on its share of each epoch (``DistributedSampler``) with
DistributedDataParallel; metrics are reduced over processes and only rank 0 writes files and logs.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..datasets import build_cls_datasets, build_cls_val_dataset
from ..models import count_parameters, get_cls_net
from ..utils.checkpoint import load_weights, save_checkpoint
from ..utils.distributed import DistInfo, ShardSampler, all_gather_object, barrier, cleanup
from ..utils.optim import build_optimizer, build_scheduler, load_scheduler_state
from .checkpointing import (CheckpointManager, GracefulStop, ResumableSampler, TrainingDiverged, TrainState,
                            loader_generator, start_epoch)
from .cls_function import train_one_epoch, unwrap, validate
from .launch import base_parser, config_from_args, setup_process
from .launch import parse_args as parse_launch_args

logger = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pth.tar"
BEST = "model_best.pth.tar"
FINAL = "final_state.pth"


# ---------------------------------------------------------------------------------------- set-up
def parse_args(argv: Optional[Sequence[str]] = None, description: str = "", sweep: bool = False) -> argparse.Namespace:
    """The options of the original MDEQ scripts (:func:`mdeq.core.launch.base_parser`) and ``--percent``;
    with ``sweep`` (cls_valid) also ``--f-thres-sweep``."""
    p = base_parser(description)
    p.add_argument("--percent", type=float, default=1.0, help="fraction of the training set (PERCENT)")
    if sweep:
        p.add_argument("--f-thres-sweep", dest="f_thres_sweep", default="",
                       help="evaluate at each of these forward budgets, e.g. 2,4,8,16,32 (table in the log, "
                            "PNG plot and JSON in the output folder); --testModel may then list several "
                            "checkpoints, comma-separated, one curve each")
    return parse_launch_args(p, argv)


def setup(args: argparse.Namespace, phase: str):
    """Config, process group, logging, seeds. Returns (cfg, DistInfo, output dir, TensorBoard dir)."""
    cfg = config_from_args(args, ["PERCENT", float(args.percent)] if args.percent != 1.0 else [])
    info, out_dir, tb_dir = setup_process(cfg, args.cfg, phase, args.local_rank)
    logger.info("overrides: %s", " ".join(map(str, args.opts)) or "none")
    return cfg, info, out_dir, tb_dir


def f_flops(model: nn.Module, image_size: Sequence[int]) -> Optional[int]:
    """FLOPs of one evaluation of f_theta for one image (None if they cannot be counted)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
        net = unwrap(model)
        was_training = net.training
        net.eval()
        try:
            p = next(net.parameters())
            x = torch.zeros(1, 3, int(image_size[1]), int(image_size[0]), device=p.device, dtype=p.dtype)
            with torch.no_grad():
                inj = net.injection(x)
                z = [inj.new_zeros(1, *s) for s in net.state_shapes(inj)]
                counter = FlopCounterMode(display=False)
                with counter:
                    net.fullstage(z, inj)
            return int(counter.get_total_flops())
        finally:
            net.train(was_training)
    except Exception as e:  # the summary is informative only
        logger.debug("FLOP count skipped: %s", e)
        return None


def log_model_summary(model: nn.Module, cfg) -> Dict[str, Any]:
    """Log the parameter count and the FLOPs of one f evaluation; return them."""
    n = count_parameters(unwrap(model))
    size = list(cfg.MODEL.IMAGE_SIZE) if len(cfg.MODEL.IMAGE_SIZE) == 2 else [32, 32]
    flops = f_flops(model, size)
    logger.info("model: %s, %s trainable parameters; one f evaluation: %s (input %dx%d)",
                type(unwrap(model)).__name__, f"{n:,}", "n/a" if flops is None else f"{flops / 1e6:.1f} MFLOPs",
                size[0], size[1])
    return {"parameters": n, "f_flops": flops}


def _loader(ds: Dataset, batch: int, sampler, cfg, info: DistInfo, train: bool) -> DataLoader:
    workers = max(0, int(cfg.WORKERS))
    return DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers,
                      pin_memory=bool(cfg.PIN_MEMORY) and info.device.type == "cuda",
                      drop_last=False, persistent_workers=False,
                      generator=loader_generator(cfg.SEED, info.rank) if train else None)


def _check_classes(ds: Dataset, cfg) -> None:
    base = getattr(ds, "dataset", ds)
    classes = getattr(base, "classes", None)
    if classes and len(classes) != cfg.MODEL.NUM_CLASSES:
        raise ConfigError(f"MODEL.NUM_CLASSES = {cfg.MODEL.NUM_CLASSES} but DATASET.DATASET "
                         f"{cfg.DATASET.DATASET!r} has {len(classes)} classes")


def param_checksum(model: nn.Module) -> float:
    """Sum of all parameters in float64, to compare replicas across ranks (buffers such as batch-norm
    running statistics are left out: each rank updates them from its own batches)."""
    return float(sum(p.detach().double().sum().item() for p in unwrap(model).parameters()))


# ---------------------------------------------------------------------------------------- training
def train(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_train.py``: train, checkpoint every epoch, evaluate; returns the final metrics."""
    args = parse_args(argv, "Train an MDEQ image classifier")
    cfg, info, out_dir, tb_dir = setup(args, "train")
    start_time = time.time()
    try:
        return _train(cfg, info, out_dir, tb_dir, start_time)
    finally:
        cleanup()


def _train(cfg, info: DistInfo, out_dir: str, tb_dir: str, start_time: float) -> Dict[str, Any]:
    device = info.device
    manager = CheckpointManager(out_dir, cfg.TRAIN.KEEP_CHECKPOINTS, info.is_main, "best_acc", cfg.TRAIN.CHECKPOINT)
    resume = manager.check_start(cfg.TRAIN.RESUME, cfg.AUTO_RESUME)  # before anything is written
    ckpt = manager.load(device) if resume else None  # a bad file fails here, before the data is read
    if info.is_main:
        logger.info("config:\n%s", cfg.dump())
    model = get_cls_net(cfg).to(device)
    if cfg.TRAIN.MODEL_FILE:
        load_weights(model, cfg.TRAIN.MODEL_FILE)
        logger.info("initialised from %s", cfg.TRAIN.MODEL_FILE)
    summary = log_model_summary(model, cfg)

    train_ds, val_ds = build_cls_datasets(cfg)
    _check_classes(val_ds, cfg)
    logger.info("dataset %s: %d training, %d held-out images", cfg.DATASET.DATASET, len(train_ds), len(val_ds))
    # the same sampler with one replica or many: the shuffling depends only on SEED and the epoch
    train_sampler = ResumableSampler(train_ds, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=bool(cfg.TRAIN.SHUFFLE), seed=cfg.SEED, drop_last=False)
    train_loader = _loader(train_ds, cfg.TRAIN.BATCH_SIZE_PER_GPU, train_sampler, cfg, info, True)
    val_loader = _loader(val_ds, cfg.TEST.BATCH_SIZE_PER_GPU, ShardSampler(len(val_ds), info.rank, info.world_size),
                         cfg, info, False)
    iters_per_epoch = len(train_loader)

    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, iters_per_epoch)
    amp = bool(cfg.TRAIN.AMP) and device.type == "cuda"
    if cfg.TRAIN.AMP and not amp:
        logger.warning("TRAIN.AMP is set but the device is %s: training in float32", device)
    scaler = torch.amp.GradScaler("cuda") if amp else None
    criterion = nn.CrossEntropyLoss().to(device)

    state = TrainState()
    begin_epoch, start_batch, best_acc = cfg.TRAIN.BEGIN_EPOCH, 0, 0.0
    if ckpt is not None:
        begin_epoch, start_batch, best_acc = manager.restore(
            ckpt, model, optimizer, scheduler, scaler, state, info.rank, info.world_size, cfg.SEED,
            load_scheduler=load_scheduler_state)
        del ckpt

    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False)

    writer = None
    if info.is_main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(log_dir=tb_dir)

    end_epoch = cfg.TRAIN.END_EPOCH
    logger.info("training epochs %d..%d, %d steps per epoch (global batch %d), warm-up for the first %d steps",
                begin_epoch, end_epoch - 1, iters_per_epoch, cfg.TRAIN.BATCH_SIZE_PER_GPU * info.world_size,
                cfg.TRAIN.PRETRAIN_STEPS)
    val_res: Dict[str, Any] = {}
    epoch = begin_epoch

    def checkpoint(epoch_: int, batch_: int, epoch_end: bool) -> Optional[str]:
        ckpt_ = manager.build(model, optimizer, scheduler, scaler, state, epoch_, batch_, best_acc, cfg,
                              train_sampler, info.world_size)
        return manager.save(ckpt_, model, state, epoch_end)

    try:
        with GracefulStop() as stopper:
            for epoch in range(begin_epoch, end_epoch):
                softplus = bool(cfg.MODEL.SOFTPLUS_WARMUP) and epoch < cfg.TRAIN.SOFTPLUS_EPOCHS
                unwrap(model).set_softplus(softplus)
                start_epoch(train_loader, train_sampler, epoch, start_batch, cfg.TRAIN.BATCH_SIZE_PER_GPU,
                            cfg.SEED, info.rank)
                t0 = time.time()
                tr = train_one_epoch(model, train_loader, criterion, optimizer, scheduler, epoch, state, cfg,
                                     device, writer=writer, scaler=scaler, is_main=info.is_main,
                                     start_batch=start_batch, stopper=stopper)
                start_batch = 0
                train_sampler.set_start(0)
                if state.interrupted:  # SIGTERM / SIGINT: save where we are and leave
                    saved = checkpoint(epoch, state.batch_in_epoch, False)
                    barrier()
                    raise manager.interrupted(stopper, saved)
                val_res = validate(model, val_loader, criterion, cfg, device, writer=writer,
                                   step=state.global_step, is_main=info.is_main)
                phase = "warm-up" if state.global_step <= cfg.TRAIN.PRETRAIN_STEPS else "equilibrium"
                logger.info("epoch %d (%s%s, %.0fs): train loss %.4f top-1 %.2f%% | held-out loss %.4f top-1 "
                            "%.2f%% top-5 %.2f%% | f steps %.1f (val %.1f), b steps %s, lr %.3g, skipped steps %d",
                            epoch, phase, ", softplus" if softplus else "", time.time() - t0, tr["loss"],
                            tr["top1"], val_res["loss"], val_res["top1"], val_res["top5"],
                            tr.get("f_steps", float("nan")), val_res.get("f_steps", float("nan")),
                            f"{tr['b_steps']:.1f}" if "b_steps" in tr else "-", tr["lr"], state.skipped_steps)
                is_best = val_res["top1"] > best_acc
                best_acc = max(best_acc, val_res["top1"])
                saved = checkpoint(epoch + 1, 0, True)
                if info.is_main:
                    if is_best and saved:
                        save_checkpoint({"model": unwrap(model).state_dict(), "epoch": epoch + 1,
                                         "best_acc": best_acc, "config": cfg.dump()}, os.path.join(out_dir, BEST))
                    writer.add_scalar("valid/best_top1", best_acc, epoch)
                barrier()
                if stopper.should_stop():  # the signal came during validation: the epoch's checkpoint is saved
                    raise manager.interrupted(stopper, saved)
                if state.stop:
                    logger.info("TRAIN.MAX_ITERS = %d reached at epoch %d", cfg.TRAIN.MAX_ITERS, epoch)
                    break
    except TrainingDiverged as e:
        raise manager.diverged(e) from e
    finally:
        if writer is not None:
            writer.close()

    if not val_res:  # nothing left to train (resumed at END_EPOCH): evaluate the weights as they are
        val_res = validate(model, val_loader, criterion, cfg, device, is_main=info.is_main)
    checksums = all_gather_object(param_checksum(model))
    if info.distributed:
        same = all(abs(c - checksums[0]) <= 1e-9 * max(1.0, abs(checksums[0])) for c in checksums)
        (logger.info if same else logger.error)("parameter checksums per rank: %s (%s)", checksums,
                                                "identical" if same else "REPLICAS DIFFER")
    wall = time.time() - start_time
    results = {"top1": val_res["top1"], "top5": val_res["top5"], "loss": val_res["loss"],
               "f_steps": val_res.get("f_steps"), "f_rel": val_res.get("f_rel"), "best_acc": best_acc,
               "epochs": epoch + 1, "global_step": state.global_step, "skipped_steps": state.skipped_steps,
               "wall_time_s": wall, "world_size": info.world_size, "rank_checksums": checksums, **summary}
    if info.is_main:
        save_checkpoint(unwrap(model).state_dict(), os.path.join(out_dir, FINAL))
        with open(os.path.join(out_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    logger.info("final held-out top-1: %.2f%% (top-5 %.2f%%, loss %.4f, %d images, mean f steps %.1f); "
                "best %.2f%%; wall time %.1fs", val_res["top1"], val_res["top5"], val_res["loss"],
                val_res["num_samples"], val_res.get("f_steps", float("nan")), best_acc, wall)
    return results


# ---------------------------------------------------------------------------------------- evaluation
def valid(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``tools/cls_valid.py``: evaluate a checkpoint on the held-out set; returns the metrics."""
    args = parse_args(argv, "Evaluate an MDEQ image classifier", sweep=True)
    cfg, info, out_dir, _ = setup(args, "valid")
    try:
        device = info.device
        model = get_cls_net(cfg).to(device)
        if args.f_thres_sweep:
            return _sweep(cfg, info, out_dir, model, args.f_thres_sweep)
        path = cfg.TEST.MODEL_FILE or os.path.join(out_dir, FINAL)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no model to evaluate: {path} does not exist (give --testModel FILE or "
                                    f"TEST.MODEL_FILE, or train first so that {FINAL} exists)")
        load_weights(model, path)
        logger.info("weights: %s", path)
        summary = log_model_summary(model, cfg)
        val_ds = build_cls_val_dataset(cfg)
        _check_classes(val_ds, cfg)
        loader = _loader(val_ds, cfg.TEST.BATCH_SIZE_PER_GPU, ShardSampler(len(val_ds), info.rank, info.world_size),
                         cfg, info, False)
        t0 = time.time()
        res = validate(model, loader, nn.CrossEntropyLoss(), cfg, device, is_main=info.is_main)
        res.update(model_file=path, time_s=time.time() - t0, **summary)
        logger.info("held-out (%s, %d images): top-1 %.2f%%, top-5 %.2f%%, loss %.4f, mean f steps %.2f, "
                    "final residual rel %.3g abs %.3g", cfg.DATASET.DATASET, res["num_samples"], res["top1"],
                    res["top5"], res["loss"], res.get("f_steps", float("nan")), res.get("f_rel", float("nan")),
                    res.get("f_abs", float("nan")))
        if info.is_main:
            with open(os.path.join(out_dir, "valid_results.json"), "w") as f:
                json.dump(res, f, indent=2)
        return res
    finally:
        cleanup()


def _sweep(cfg, info: DistInfo, out_dir: str, model: nn.Module, budgets: str) -> Dict[str, Any]:
    """``cls_valid.py --f-thres-sweep``: held-out top-1 and residuals of each checkpoint at each budget."""
    from ..analysis.sweep import parse_budgets, sweep_models
    thresholds = parse_budgets(budgets)
    files = [p for p in (cfg.TEST.MODEL_FILE or os.path.join(out_dir, FINAL)).split(",") if p]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no model to evaluate: {path} does not exist (--testModel)")
    val_ds = build_cls_val_dataset(cfg)
    loader = _loader(val_ds, cfg.TEST.BATCH_SIZE_PER_GPU, ShardSampler(len(val_ds), info.rank, info.world_size),
                     cfg, info, False)
    rows = sweep_models(files, lambda p: load_weights(model, p),
                        lambda t: validate(model, loader, nn.CrossEntropyLoss(), cfg, info.device, is_main=info.is_main,
                                           f_thres=t, desc=f"F_THRES {t}"),
                        thresholds, out_dir, "top1", "held-out top-1 (%)", write=info.is_main)
    return {p: [r.as_dict() for r in rs] for p, rs in rows.items()}
