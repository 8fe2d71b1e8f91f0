"""What ``tools/seg_train.py`` and ``tools/seg_test.py`` run: argument parsing, set-up (config,
distributed, logging, model, weights), the epoch loop with checkpoints, and the test pass.

Checkpoints (written by rank 0 alone, atomically) under the output folder
``OUTPUT_DIR/cityscapes/<config name>/``:

* ``checkpoint.pth.tar`` every epoch and when SIGTERM / SIGINT stops the run (mid-epoch, at a step
  boundary): model, optimizer, scheduler, AMP scaler, epoch and batch within it, global step, best
  mIoU, RNG states, sampler seed (what ``TRAIN.RESUME`` continues from exactly, see
  :mod:`mdeq.core.checkpointing`); ``checkpoint_ep{N:04d}.pth.tar``: the last
  ``TRAIN.KEEP_CHECKPOINTS`` epoch copies (when > 1);
* ``best.pth``: the model of the best validation mIoU so far;
* ``final_state.pth``: the model at the end of training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
from typing import Dict, List, Optional

import cv2
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..datasets.cityscapes import CLASS_NAMES, CityscapesDataset, colorize, train_ids_to_label_ids
from ..models import count_parameters, get_seg_net
from ..utils.checkpoint import load_pretrained, load_weights, save_checkpoint
from ..utils.distributed import ShardSampler, barrier, cleanup
from ..utils.optim import build_optimizer, build_scheduler
from .criterion import build_criterion
from .checkpointing import (CheckpointManager, GracefulStop, ResumableSampler, TrainingDiverged, TrainState,
                            loader_generator, start_epoch)
from .launch import base_parser, config_from_args, setup_process
from .launch import parse_args as parse_launch_args
from .seg_function import evaluate, format_scores, train_one_epoch

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- arguments
def parse_seg_args(description: str, test: bool = False, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The shared options (:func:`mdeq.core.launch.base_parser`); seg_test adds ``--no-pictures``."""
    p = base_parser(description)
    if test:
        p.add_argument("--no-pictures", dest="pictures", action="store_false",
                       help="do not write prediction pictures of a labelled list")
        p.add_argument("--f-thres-sweep", dest="f_thres_sweep", default="",
                       help="mIoU and residuals at each of these forward budgets, e.g. 2,4,8,16,32 (table in the "
                            "log, PNG and JSON in the output folder); --testModel may list several checkpoints, "
                            "comma-separated")
    args = parse_launch_args(p, argv)
    if not test:
        args.pictures = False
        args.f_thres_sweep = ""
    return args


# ---------------------------------------------------------------------------------------------- set-up
class Context:
    """Rank, world size, device and output folders of this process."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, out_dir: str,
                 tb_dir: str) -> None:
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.out_dir, self.tb_dir = out_dir, tb_dir

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(args: argparse.Namespace, cfg, phase: str) -> Context:
    """Process group, logging, seeds and output folders (:func:`mdeq.core.launch.setup_process`)."""
    info, out_dir, tb_dir = setup_process(cfg, args.cfg, phase, args.local_rank)
    return Context(info.rank, info.world_size, info.local_rank, info.device, out_dir, tb_dir)


def _worker_init(worker_id: int) -> None:
    # python's random drives the augmentation: give every worker of every rank its own stream
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


def make_loader(dataset, cfg, ctx: Context, train: bool) -> DataLoader:
    """Training: a :class:`ResumableSampler` (seeded by SEED and the epoch, one process or many) and a
    private generator (exact resumption); evaluation: each rank its shard, in order."""
    if train:
        sampler = ResumableSampler(dataset, ctx.world_size, ctx.rank, shuffle=cfg.TRAIN.SHUFFLE, seed=cfg.SEED,
                                   drop_last=True)
        batch = cfg.TRAIN.BATCH_SIZE_PER_GPU
    else:
        sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size) if ctx.distributed else None
        batch = cfg.TEST.BATCH_SIZE_PER_GPU
    return DataLoader(dataset, batch_size=batch, shuffle=False, sampler=sampler, num_workers=cfg.WORKERS,
                      pin_memory=cfg.PIN_MEMORY and ctx.device.type == "cuda", drop_last=train,
                      worker_init_fn=_worker_init, persistent_workers=False,
                      generator=loader_generator(cfg.SEED, ctx.rank) if train else None)


def load_backbone(model: nn.Module, path: str) -> Dict[str, List[str]]:
    """Initialise the stem and f_theta from a classification checkpoint (ours or the original's
    ``.pkl``): the classification head (``incre_modules``, ``downsamp_modules``, ``final_layer``,
    ``classifier``) is dropped, the segmentation head keeps its initialisation, and the modules not
    found on either side are logged. A missing stem or f_theta weight is an error."""
    logger.info("MODEL.PRETRAINED: loading the backbone of %s", path)
    report = load_pretrained(model, path, required_prefixes=("downsample.", "stage0.", "fullstage."))
    if report["shape"]:
        logger.warning("shape mismatches, kept at initialisation: %s", report["shape"])
    return report


def build_model(cfg, ctx: Context, for_training: bool) -> nn.Module:
    model = get_seg_net(cfg)
    logger.info("segmentation MDEQ: %s trainable parameters", f"{count_parameters(model):,}")
    if for_training:
        if cfg.MODEL.PRETRAINED:
            load_backbone(model, cfg.MODEL.PRETRAINED)
        if cfg.TRAIN.MODEL_FILE:
            logger.info("TRAIN.MODEL_FILE: loading every weight of %s", cfg.TRAIN.MODEL_FILE)
            load_weights(model, cfg.TRAIN.MODEL_FILE, strict=True)
    model.to(ctx.device)
    if for_training and ctx.distributed:
        if ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            logger.info("batch norm: SyncBatchNorm over %d processes", ctx.world_size)
        else:
            logger.info("batch norm: SyncBatchNorm needs CUDA; each of the %d CPU processes keeps its own "
                        "BatchNorm2d statistics (rank 0's are broadcast every step)", ctx.world_size)
    return model


# ---------------------------------------------------------------------------------------------- training
def train_main(args: argparse.Namespace) -> Dict:
    cfg = config_from_args(args)
    ctx = setup(args, cfg, "train")
    try:
        return _train(cfg, ctx)
    finally:
        cleanup()


def _train(cfg, ctx: Context) -> Dict:
    manager = CheckpointManager(ctx.out_dir, cfg.TRAIN.KEEP_CHECKPOINTS, ctx.main, "best_miou", cfg.TRAIN.CHECKPOINT)
    resume = manager.check_start(cfg.TRAIN.RESUME, cfg.AUTO_RESUME)  # before anything is written
    ckpt = manager.load(ctx.device) if resume else None  # a bad file fails here, before the data is read
    train_set = CityscapesDataset.from_config(cfg, "train")
    val_set = CityscapesDataset.from_config(cfg, "val") if cfg.DATASET.TEST_SET else None
    train_loader = make_loader(train_set, cfg, ctx, train=True)
    if len(train_loader) == 0:
        raise ConfigError(f"{cfg.DATASET.TRAIN_SET}: {len(train_set)} images give no full batch of "
                         f"{cfg.TRAIN.BATCH_SIZE_PER_GPU} per process on {ctx.world_size} processes")
    val_loader = make_loader(val_set, cfg, ctx, train=False) if val_set is not None else None

    model = build_model(cfg, ctx, for_training=True)
    net = model
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    optimizer = build_optimizer(cfg, net)
    scheduler = build_scheduler(cfg, optimizer, len(train_loader))  # stepped after every optimizer step
    per_iter = True
    scaler = torch.amp.GradScaler("cuda") if cfg.TRAIN.AMP and ctx.device.type == "cuda" else None
    criterion = build_criterion(cfg).to(ctx.device)

    state = TrainState()
    begin, start_batch, best_miou = cfg.TRAIN.BEGIN_EPOCH, 0, -1.0
    if ckpt is not None:
        begin, start_batch, best_miou = manager.restore(ckpt, net, optimizer, scheduler, scaler,
                                                        state, ctx.rank, ctx.world_size, cfg.SEED)
        logger.info("continuing at epoch %d, step %d (batch %d of the epoch), best mIoU %.4f", begin,
                    state.global_step, start_batch, best_miou)
        del ckpt
    sampler = train_loader.sampler

    writer = None
    if ctx.main:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(ctx.tb_dir)
    ignore = cfg.TRAIN.IGNORE_LABEL if cfg.TRAIN.IGNORE_LABEL >= 0 else 255
    last_scores: Dict = {}
    epoch = begin

    def checkpoint(epoch_: int, batch_: int, epoch_end: bool) -> Optional[str]:
        ckpt = manager.build(model, optimizer, scheduler, scaler, state, epoch_, batch_, best_miou, cfg, sampler,
                             ctx.world_size)
        return manager.save(ckpt, model, state, epoch_end)

    try:
        with GracefulStop() as stopper:
            for epoch in range(begin, cfg.TRAIN.END_EPOCH):
                if 0 <= cfg.TRAIN.MAX_ITERS <= state.global_step:
                    break
                start_epoch(train_loader, sampler, epoch, start_batch, cfg.TRAIN.BATCH_SIZE_PER_GPU, cfg.SEED,
                            ctx.rank)
                result = train_one_epoch(model, train_loader, criterion, optimizer, epoch, cfg, ctx.device, state,
                                         scheduler=scheduler, scheduler_per_iter=per_iter, scaler=scaler,
                                         writer=writer, rank=ctx.rank, max_iters=cfg.TRAIN.MAX_ITERS,
                                         start_batch=start_batch, stopper=stopper)
                start_batch = 0
                sampler.set_start(0)
                if state.interrupted:  # SIGTERM / SIGINT: save where we are and leave
                    saved = checkpoint(epoch, state.batch_in_epoch, False)
                    barrier()
                    raise manager.interrupted(stopper, saved)
                if scheduler is not None and not per_iter:
                    scheduler.step()
                logger.info("epoch %d: mean loss %.4f over %d steps (%d skipped), global step %d", epoch,
                            result["loss"], result["steps"], result["skipped"], state.global_step)
                if val_loader is not None:
                    last_scores = evaluate(net, val_loader, cfg.DATASET.NUM_CLASSES, ctx.device, ignore,
                                           rank=ctx.rank, class_names=CLASS_NAMES)
                    logger.info("epoch %d validation:\n%s", epoch, format_scores(last_scores))
                    if writer is not None:
                        writer.add_scalar("val/miou", last_scores["miou"], epoch)
                        writer.add_scalar("val/pixel_acc", last_scores["pixel_acc"], epoch)
                        writer.add_scalar("val/mean_f_steps", last_scores["mean_f_steps"], epoch)
                miou = last_scores.get("miou", float("nan"))
                is_best = miou == miou and miou > best_miou
                if miou == miou:
                    best_miou = max(best_miou, miou)
                saved = checkpoint(epoch + 1, 0, True)
                if ctx.main and is_best and saved:
                    save_checkpoint({"model": net.state_dict(), "epoch": epoch + 1, "miou": miou},
                                    os.path.join(ctx.out_dir, "best.pth"))
                    logger.info("new best mIoU %.4f (epoch %d) -> best.pth", miou, epoch)
                barrier()
                if stopper.should_stop():  # the signal came during validation: the epoch's checkpoint is saved
                    raise manager.interrupted(stopper, saved)
    except TrainingDiverged as e:
        raise manager.diverged(e) from e
    finally:
        if writer is not None:
            writer.close()
    if ctx.main:
        save_checkpoint({"model": net.state_dict(), "epoch": epoch + 1, "global_step": state.global_step},
                        os.path.join(ctx.out_dir, "final_state.pth"))
        logger.info("done: %d steps; final_state.pth in %s; best mIoU %.4f", state.global_step, ctx.out_dir,
                    best_miou)
    return {"best_miou": best_miou, "global_step": state.global_step, "scores": last_scores}


# ---------------------------------------------------------------------------------------------- testing
def _write_png(path: str, array: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(path, array):
        raise OSError(f"could not write {path}")


def test_main(args: argparse.Namespace) -> Dict:
    cfg = config_from_args(args)
    ctx = setup(args, cfg, "test")
    try:
        if args.f_thres_sweep:
            return _sweep(cfg, ctx, args.f_thres_sweep)
        return _test(cfg, ctx, pictures=args.pictures)
    finally:
        cleanup()


def _test(cfg, ctx: Context, pictures: bool = True) -> Dict:
    model_file = cfg.TEST.MODEL_FILE or os.path.join(ctx.out_dir, "final_state.pth")
    model = build_model(cfg, ctx, for_training=False)
    load_weights(model, model_file, strict=True)
    logger.info("evaluating %s", model_file)
    dataset = CityscapesDataset.from_config(cfg, "test")
    loader = make_loader(dataset, cfg, ctx, train=False)
    list_name = os.path.splitext(os.path.basename(cfg.DATASET.TEST_SET))[0]
    pic_dir = os.path.join(ctx.out_dir, f"{list_name}_results")
    by_name = {f["name"]: i for i, f in enumerate(dataset.files)}
    ignore = cfg.TRAIN.IGNORE_LABEL if cfg.TRAIN.IGNORE_LABEL >= 0 else 255
    scales = list(cfg.TEST.SCALE_LIST) if cfg.TEST.MULTI_SCALE else [1.0]

    def write(pred: np.ndarray, name: str) -> None:
        # label ids: the benchmark's format and name (same base name as the input image)
        _write_png(os.path.join(pic_dir, "label_ids", f"{name}.png"), train_ids_to_label_ids(pred))
        if dataset.labeled and not pictures:
            return
        color = colorize(pred)
        _write_png(os.path.join(pic_dir, "color", f"{name}.png"), color)
        if dataset.labeled:
            image = dataset.load_image(by_name[name])
            _write_png(os.path.join(pic_dir, "overlay", f"{name}.png"),
                       cv2.addWeighted(image, 0.5, color, 0.5, 0.0))

    scores = evaluate(model, loader, cfg.DATASET.NUM_CLASSES, ctx.device, ignore, scales=scales,
                      flip=cfg.TEST.FLIP_TEST, rank=ctx.rank, class_names=CLASS_NAMES, on_prediction=write)
    if not dataset.labeled:
        logger.info("%d predictions (label ids, benchmark format) written to %s; mean solver steps %.2f",
                    scores["images"], os.path.join(pic_dir, "label_ids"), scores["mean_f_steps"])
        return {"images": scores["images"], "mean_f_steps": scores["mean_f_steps"], "output": pic_dir}
    logger.info("%s (%d images, scales %s, flip %s):\n%s", cfg.DATASET.TEST_SET, scores["images"], scales,
                cfg.TEST.FLIP_TEST, format_scores(scores))
    if ctx.main:
        report = {k: scores[k] for k in ("miou", "pixel_acc", "mean_class_acc", "mean_f_steps", "iou_per_class",
                                         "images", "pixels", "confusion")}
        report.update(model_file=model_file, list=cfg.DATASET.TEST_SET, scales=scales, flip=cfg.TEST.FLIP_TEST)
        json_path = os.path.join(ctx.out_dir, f"{list_name}_results.json")
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2, allow_nan=True)
        logger.info("results written to %s, pictures to %s", json_path, pic_dir)
    return scores


def _sweep(cfg, ctx: Context, budgets: str) -> Dict:
    """``seg_test.py --f-thres-sweep``: mIoU (%), mean relative residual and f steps of each checkpoint at
    each forward budget (no pictures)."""
    from ..analysis.sweep import SolverStatsRecorder, parse_budgets, sweep_models
    thresholds = parse_budgets(budgets)
    files = [p for p in (cfg.TEST.MODEL_FILE or os.path.join(ctx.out_dir, "final_state.pth")).split(",") if p]
    model = build_model(cfg, ctx, for_training=False)
    loader = make_loader(CityscapesDataset.from_config(cfg, "test"), cfg, ctx, train=False)
    ignore = cfg.TRAIN.IGNORE_LABEL if cfg.TRAIN.IGNORE_LABEL >= 0 else 255
    scales = list(cfg.TEST.SCALE_LIST) if cfg.TEST.MULTI_SCALE else [1.0]

    def run(t: int) -> Dict:
        model.f_thres = t  # the budget every forward of this evaluation uses
        with SolverStatsRecorder(model) as rec:
            scores = evaluate(model, loader, cfg.DATASET.NUM_CLASSES, ctx.device, ignore, scales=scales,
                              flip=cfg.TEST.FLIP_TEST, rank=ctx.rank, class_names=CLASS_NAMES)
        return {"miou": 100.0 * scores["miou"], "f_steps": scores["mean_f_steps"], "f_rel": rec.means()["f_rel"]}

    rows = sweep_models(files, lambda p: load_weights(model, p, strict=True), run, thresholds, ctx.out_dir,
                        "miou", "mIoU (%)", write=ctx.main)
    return {p: [r.as_dict() for r in rs] for p, rs in rows.items()}
