"""Checkpoints, exact resumption, graceful stops and the divergence guard, shared by the
classification (:mod:`mdeq.core.cls_runner`) and segmentation (:mod:`mdeq.core.seg_runner`) programs.

* :class:`CheckpointManager` writes ``checkpoint.pth.tar`` (the latest, atomically) and keeps the
  last ``TRAIN.KEEP_CHECKPOINTS`` epoch copies ``checkpoint_ep{N:04d}.pth.tar`` (N = epochs done).
  A checkpoint holds the model, optimizer, scheduler and AMP scaler states, the position (``epoch``,
  ``batch_in_epoch``: the next batch to run), the global step, the bad-step counters, the best
  metric, the config, every rank's RNG states (Python, NumPy, torch, CUDA) and the sampler's seed,
  so that a resumed run continues exactly (same batches in the same order, same random numbers).
  It never overwrites the last checkpoint while steps are being skipped or with non-finite weights.
* :class:`GracefulStop` turns SIGTERM / SIGINT into a request to stop at the next step boundary;
  the runners then save a mid-epoch checkpoint and exit with :class:`TrainingInterrupted`.
* :class:`ResumableSampler` is the seeded ``DistributedSampler`` that can start an epoch at a batch.
* :class:`StepGuard` skips steps whose loss or gradient is not finite or whose forward solver hit
  its divergence guard, logs them with the solver statistics and stops the run after
  ``TRAIN.MAX_BAD_STEPS`` consecutive ones (:class:`TrainingDiverged`).
"""
from __future__ import annotations

import logging
import math
import os
import shlex
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data.distributed import DistributedSampler

from ..utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..utils.distributed import all_gather_object, all_reduce_sum, is_initialized
from ..utils.rng import get_rng_state, set_rng_state

logger = logging.getLogger(__name__)

LATEST = "checkpoint.pth.tar"
EPOCH_PREFIX = "checkpoint_ep"
FORMAT_VERSION = 2

#: exit statuses of the tools (see :mod:`mdeq.core.cli`)
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

SOLVER_KEYS = ("f_steps", "f_abs", "f_rel", "b_steps", "b_abs", "b_rel", "b_fallback", "jac_loss")


class TrainingDiverged(RuntimeError):
    """Too many consecutive skipped steps (non-finite loss / gradient, or a diverged forward solver)."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after a checkpoint was saved; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


@dataclass
class TrainState:
    """What the training loop carries across steps, epochs and checkpoints.

    Attributes:
        global_step: the step count that drives the warm-up / equilibrium switch and the logs.
        bad_steps: the current run of consecutive skipped steps.
        skipped_steps: skipped steps in total.
        batch_in_epoch: batches of the current epoch consumed so far (the resume position).
        stop: set when TRAIN.MAX_ITERS is reached.
        interrupted: set when a stop signal ended the epoch early (a checkpoint is due).
    """

    global_step: int = 0
    bad_steps: int = 0
    skipped_steps: int = 0
    batch_in_epoch: int = 0
    stop: bool = False
    interrupted: bool = False
    history: Dict[str, Any] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if hasattr(model, "module") else model


def _any_rank(flag: bool) -> bool:
    """True if ``flag`` is set on any process (so that every rank takes the same branch)."""
    if not is_initialized():
        return bool(flag)
    return all_reduce_sum(float(bool(flag))) > 0


# ------------------------------------------------------------------------------------------- signals
class GracefulStop:
    """Context manager: SIGTERM / SIGINT ask the training loop to stop at the next step boundary.

    The first signal only sets a flag (the current step finishes, a checkpoint is saved, the program
    exits non-zero saying how to resume). A second signal abandons at once (``KeyboardInterrupt``);
    the atomic writes leave the previous checkpoint intact. Handlers are installed only in the main
    thread and restored on exit.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum  # no logging here: the handler may run inside a logging call
            return
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: abandoned")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def name(self) -> str:
        """The name of the signal received (``'SIGTERM'``), or ``''``."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signum is not None

    def should_stop(self) -> bool:
        """Whether any process received a stop signal (a collective when distributed: call it on
        every rank at the same step)."""
        stop = _any_rank(self.requested())
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled
        return stop


# ------------------------------------------------------------------------------------------- sampler
class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded by ``seed`` and the epoch, also with one process) that can
    start the epoch at a given sample (:meth:`set_start`), so a resumed run skips the batches it
    already consumed in the same shuffle order without loading them."""

    def __init__(self, dataset: Any, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` samples of this process's share of the current epoch."""
        self.start = max(0, int(start))

    def __iter__(self):
        indices = list(super().__iter__())
        return iter(indices[self.start:])

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)

    def state(self) -> Dict[str, Any]:
        """What a checkpoint records about the shuffling."""
        return {"seed": int(self.seed), "epoch": int(self.epoch), "shuffle": bool(self.shuffle),
                "num_replicas": int(self.num_replicas)}


def loader_generator(seed: int, rank: int) -> torch.Generator:
    """A private generator for a DataLoader: its worker seeds no longer draw from (and advance) the
    global torch RNG, so creating the loader iterator of a resumed epoch changes no random number."""
    return torch.Generator().manual_seed(int(seed) * 1000 + int(rank) + 12345)


def start_epoch(loader: Any, sampler: ResumableSampler, epoch: int, start_batch: int, batch_size: int,
                seed: int, rank: int) -> None:
    """Set the sampler's epoch and start position and reseed the loader's generator for ``epoch``."""
    sampler.set_epoch(epoch)
    sampler.set_start(start_batch * batch_size)
    gen = getattr(loader, "generator", None)
    if gen is not None:
        gen.manual_seed((int(seed) + 1) * 1_000_003 + epoch * 1009 + rank)


# ------------------------------------------------------------------------------------------- divergence
def _num(v: Any) -> Optional[float]:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().mean().item() if v.numel() else None
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def solver_diverged(stats: Dict[str, Any]) -> bool:
    """Whether the forward solver reported that it hit its divergence guard (``f_diverged``)."""
    v = stats.get("f_diverged")
    if isinstance(v, torch.Tensor):
        return bool(v.detach().any().item()) if v.numel() else False
    return bool(v)


def format_solver_stats(stats: Dict[str, Any]) -> str:
    """``mode=... f_steps=... f_rel=... b_rel=... b_fallback=...`` for the logs."""
    parts = [f"mode={stats.get('mode', '?')}"]
    for k in SOLVER_KEYS:
        v = _num(stats.get(k))
        if v is not None:
            parts.append(f"{k}={v:.4g}")
    if "f_diverged" in stats:
        parts.append(f"f_diverged={solver_diverged(stats)}")
    return " ".join(parts)


class StepGuard:
    """Decides whether a training step may update the weights, and stops a diverging run.

    Every rank reaches the same decision (the flags are all-reduced), so DDP stays in step.

    Args:
        state: the loop's :class:`TrainState` (``bad_steps`` and ``skipped_steps`` are updated).
        max_bad_steps: ``TRAIN.MAX_BAD_STEPS``; that many consecutive skipped steps raise
            :class:`TrainingDiverged`.
        advice: appended to the divergence message (what to change).
    """

    WHAT = {"loss": "non-finite loss", "gradient": "non-finite gradient",
            "solver": "forward solver divergence (f_diverged)"}

    def __init__(self, state: TrainState, max_bad_steps: int,
                 advice: str = "Lower TRAIN.LR, set TRAIN.CLIP, raise TRAIN.PRETRAIN_STEPS or MODEL.F_THRES, "
                               "or raise TRAIN.MAX_BAD_STEPS.") -> None:
        self.state = state
        self.max_bad_steps = max(1, int(max_bad_steps))
        self.advice = advice

    def forward_problem(self, loss: torch.Tensor, stats: Dict[str, Any]) -> Optional[str]:
        """``'loss'`` (not finite), ``'solver'`` (f_diverged) on any rank, or None."""
        bad_loss = not bool(torch.isfinite(loss.detach()).all().item())
        bad_solver = solver_diverged(stats)
        if is_initialized():
            flags = all_reduce_sum(torch.tensor([float(bad_loss), float(bad_solver)], dtype=torch.float64,
                                                device=loss.device))
            bad_loss, bad_solver = bool(flags[0] > 0), bool(flags[1] > 0)
        return "loss" if bad_loss else ("solver" if bad_solver else None)

    @staticmethod
    def gradient_problem(grad_norm: Optional[float]) -> Optional[str]:
        """``'gradient'`` when the (all-reduced) gradient norm is not finite."""
        return "gradient" if grad_norm is not None and not math.isfinite(grad_norm) else None

    def good(self) -> None:
        """A step that updated the weights: the run of bad steps ends."""
        self.state.bad_steps = 0

    def bad(self, reason: str, epoch: int, step: int, loss: Any, grad_norm: Optional[float],
            stats: Dict[str, Any], phase: str = "") -> None:
        """Count and log a skipped step; raise :class:`TrainingDiverged` at the limit."""
        self.state.bad_steps += 1
        self.state.skipped_steps += 1
        loss_v = _num(loss)
        logger.warning("epoch %d step %d: %s (loss %s, grad norm %s), update skipped (%d in a row, limit "
                       "TRAIN.MAX_BAD_STEPS=%d); solver: %s", epoch, step, self.WHAT.get(reason, reason),
                       "n/a" if loss_v is None else f"{loss_v:.4g}",
                       "n/a" if grad_norm is None else f"{grad_norm:.4g}", self.state.bad_steps,
                       self.max_bad_steps, format_solver_stats(stats))
        if self.state.bad_steps >= self.max_bad_steps:
            raise TrainingDiverged(
                f"training diverged: {self.state.bad_steps} consecutive steps with a {self.WHAT.get(reason, reason)} "
                f"(epoch {epoch}, global step {step}{', phase ' + phase if phase else ''}; last solver stats: "
                f"{format_solver_stats(stats)}). {self.advice}")


def grad_norm_of(model: nn.Module, clip: float) -> float:
    """The total gradient norm (clipped to ``clip`` when ``clip > 0``); inf / nan when not finite."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    max_norm = clip if clip > 0 else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


# ------------------------------------------------------------------------------------------- manager
def _sync_lrs(scheduler: Any) -> None:
    """Set the optimizer's rates to a LambdaLR's value at its current step."""
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if not lambdas:
        return
    lrs = [base * fn(scheduler.last_epoch) for base, fn in zip(scheduler.base_lrs, lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs


def _load_scheduler(scheduler: Any, state: Dict[str, Any]) -> None:
    scheduler.load_state_dict(state)
    _sync_lrs(scheduler)


def params_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite."""
    return all(bool(torch.isfinite(t).all().item()) for t in unwrap(model).state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def resume_command(argv: Optional[Sequence[str]] = None) -> str:
    """The command line that resumes this run: the same one with ``TRAIN.RESUME True``."""
    args = list(sys.argv if argv is None else argv)
    out: List[str] = []
    i = 0
    while i < len(args):
        if args[i] == "TRAIN.RESUME" and i + 1 < len(args):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return "python " + " ".join(shlex.quote(a) for a in out) + " TRAIN.RESUME True"


class CheckpointManager:
    """Saving and restoring the full training state of one run (rank 0 writes, every rank restores).

    Args:
        out_dir: the run's output folder.
        keep: ``TRAIN.KEEP_CHECKPOINTS``: epoch copies kept besides the latest (<= 1: the latest only).
        is_main: whether this process writes files.
        best_key: the name of the best metric in the checkpoint (``'best_acc'``, ``'best_miou'``).
        resume_file: ``TRAIN.CHECKPOINT`` (empty: ``out_dir/checkpoint.pth.tar``).
    """

    def __init__(self, out_dir: str, keep: int, is_main: bool, best_key: str, resume_file: str = "") -> None:
        self.out_dir = out_dir
        self.keep = int(keep)
        self.is_main = is_main
        self.best_key = best_key
        self.latest = os.path.join(out_dir, LATEST)
        self.resume_file = resume_file or self.latest
        self.last_saved: Optional[str] = None  # what the latest file holds, for the messages

    # ---------------------------------------------------------------- start-up
    def check_start(self, resume: bool, auto_resume: bool = False) -> bool:
        """Before anything is written: refuse to start afresh over an earlier run's checkpoint,
        check the file to resume from, remove stale temporary files. Returns whether to resume.

        Raises:
            CheckpointError: a fresh run would overwrite ``checkpoint.pth.tar``.
            FileNotFoundError: ``TRAIN.CHECKPOINT`` names a file that does not exist.
        """
        if self.is_main and os.path.isdir(self.out_dir):
            for f in os.listdir(self.out_dir):
                if f.startswith(".tmp-" + EPOCH_PREFIX) or f.startswith(".tmp-" + LATEST):
                    logger.warning("removing %s, the temporary file of a checkpoint write that was interrupted",
                                   os.path.join(self.out_dir, f))
                    os.remove(os.path.join(self.out_dir, f))
        if resume or auto_resume:
            if os.path.isfile(self.resume_file):
                return True
            if self.resume_file != self.latest:
                raise FileNotFoundError(f"TRAIN.CHECKPOINT {self.resume_file} does not exist: give an existing "
                                        f"checkpoint, or leave TRAIN.CHECKPOINT empty to resume from {self.latest}")
            logger.warning("TRAIN.RESUME is set but %s does not exist: starting from scratch", self.latest)
            return False
        if os.path.isfile(self.latest):
            raise CheckpointError(
                f"{self.latest} exists (an earlier run): starting afresh would overwrite it. Continue that run "
                f"with TRAIN.RESUME True, or choose another OUTPUT_DIR (--modelDir), or move the folder away.")
        return False

    # ---------------------------------------------------------------- saving
    def build(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
              state: TrainState, epoch: int, batch_in_epoch: int, best: float, cfg: Any,
              sampler: Optional[ResumableSampler], world_size: int, **extra: Any) -> Dict[str, Any]:
        """The checkpoint dict (call on every rank: it gathers the RNG states of all processes)."""
        rng_all = all_gather_object(get_rng_state())
        ckpt: Dict[str, Any] = {
            "format_version": FORMAT_VERSION, "model": unwrap(model).state_dict(),
            "optimizer": optimizer.state_dict(), "epoch": int(epoch), "batch_in_epoch": int(batch_in_epoch),
            "global_step": int(state.global_step), "bad_steps": int(state.bad_steps),
            "skipped_steps": int(state.skipped_steps), self.best_key: float(best), "config": cfg.dump(),
            "rng": rng_all, "world_size": int(world_size), "lr": float(optimizer.param_groups[0]["lr"]),
        }
        if scheduler is not None:
            ckpt["scheduler"] = scheduler.state_dict()
        if scaler is not None:
            ckpt["scaler"] = scaler.state_dict()
        if sampler is not None:
            ckpt["sampler"] = sampler.state()
        ckpt.update(extra)
        return ckpt

    def save(self, ckpt: Dict[str, Any], model: nn.Module, state: TrainState, epoch_end: bool) -> Optional[str]:
        """Write ``ckpt`` as the latest checkpoint (and, at an epoch end, as an epoch copy, pruning
        the old ones). Refused (logged, returns None) while steps are being skipped or when a weight
        is not finite: the last checkpoint from before the trouble stays. Only rank 0 writes."""
        where = f"epoch {ckpt['epoch']}, batch {ckpt['batch_in_epoch']}, global step {ckpt['global_step']}"
        if state.bad_steps > 0 or not params_finite(model):
            why = (f"the last {state.bad_steps} steps were skipped" if state.bad_steps > 0
                   else "some weights are not finite")
            logger.warning("not saving a checkpoint at %s: %s; %s keeps %s", where, why, self.latest,
                           self.last_saved or "the state from before the trouble")
            return None
        if not self.is_main:
            return self.latest
        save_checkpoint(ckpt, self.latest)
        if epoch_end and self.keep > 1:
            save_checkpoint(ckpt, os.path.join(self.out_dir, f"{EPOCH_PREFIX}{int(ckpt['epoch']):04d}.pth.tar"))
            self.prune()
        self.last_saved = where
        logger.info("checkpoint saved: %s (%s)", self.latest, where)
        return self.latest

    def prune(self) -> None:
        """Keep the newest ``keep`` epoch copies."""
        copies = sorted(f for f in os.listdir(self.out_dir) if f.startswith(EPOCH_PREFIX) and f.endswith(".pth.tar"))
        for f in copies[:max(0, len(copies) - self.keep)]:
            os.remove(os.path.join(self.out_dir, f))

    def describe_latest(self) -> str:
        """``'<path> (epoch E, batch B, global step S)'`` of the latest checkpoint, or a note that none exists."""
        if self.last_saved:
            return f"{self.latest} ({self.last_saved})"
        if os.path.isfile(self.latest):
            try:
                c = load_checkpoint(self.latest)
                return (f"{self.latest} (epoch {c.get('epoch')}, batch {c.get('batch_in_epoch', 0)}, "
                        f"global step {c.get('global_step')})")
            except (CheckpointError, OSError) as e:
                return f"{self.latest} (unreadable: {e})"
        return f"none yet ({self.latest} was never written: a resumed run starts from scratch)"

    # ---------------------------------------------------------------- resuming
    def load(self, device: Any) -> Dict[str, Any]:
        """Read the checkpoint to resume from.

        Raises:
            CheckpointError: the file is truncated, corrupt or refused; the message names the epoch
                copies that could be used instead (TRAIN.CHECKPOINT).
        """
        try:
            ckpt = load_checkpoint(self.resume_file, map_location=device)
        except CheckpointError as e:
            copies = sorted((f for f in os.listdir(self.out_dir) if f.startswith(EPOCH_PREFIX)), reverse=True) \
                if os.path.isdir(self.out_dir) else []
            alt = (f" Epoch copies in {self.out_dir}: {', '.join(copies)}; resume from one with TRAIN.CHECKPOINT "
                   f"<file>." if copies else "")
            raise CheckpointError(f"cannot resume: {e}.{alt}") from e
        if not isinstance(ckpt, dict) or "model" not in ckpt or "optimizer" not in ckpt or "epoch" not in ckpt:
            raise CheckpointError(f"cannot resume from {self.resume_file}: it is not a training checkpoint (no "
                                  f"model / optimizer / epoch entries); use TRAIN.MODEL_FILE to load weights only")
        return ckpt

    def restore(self, ckpt: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                scaler: Any, state: TrainState, rank: int, world_size: int, seed: int,
                load_scheduler: Optional[Callable[[Any, Dict], None]] = None) -> Tuple[int, int, float]:
        """Load ``ckpt`` into the objects; returns ``(epoch, batch_in_epoch, best)``.

        Raises:
            CheckpointError: the checkpoint's model does not fit (names the mismatched keys and shapes).
        """
        net = unwrap(model)
        try:
            net.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"cannot resume from {self.resume_file}: its model does not fit this config "
                                  f"(another architecture?): {e}") from e
        saved_keys = set((ckpt["optimizer"].get("param_groups") or [{}])[0]) - {"initial_lr"}
        own_keys = set(optimizer.state_dict()["param_groups"][0]) - {"initial_lr"}
        if saved_keys != own_keys:
            raise CheckpointError(f"cannot resume from {self.resume_file}: its optimizer has the settings "
                                  f"{sorted(saved_keys)}, this run's {type(optimizer).__name__} "
                                  f"{sorted(own_keys)}; resume with the TRAIN.OPTIMIZER of the interrupted run")
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt.get("scheduler") is not None:
            base_lrs = list(getattr(scheduler, "base_lrs", []))  # from this run's TRAIN.LR
            (load_scheduler or _load_scheduler)(scheduler, ckpt["scheduler"])
            if base_lrs and base_lrs != list(scheduler.base_lrs):
                logger.warning("TRAIN.LR differs from the checkpoint's (%s -> %s): the schedule continues from "
                               "step %d with the new base rate", scheduler.base_lrs, base_lrs, scheduler.last_epoch)
                scheduler.base_lrs = base_lrs
                _sync_lrs(scheduler)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        epoch, batch = int(ckpt["epoch"]), int(ckpt.get("batch_in_epoch", 0))
        state.global_step = int(ckpt.get("global_step", 0))
        state.bad_steps = int(ckpt.get("bad_steps", 0))
        state.skipped_steps = int(ckpt.get("skipped_steps", 0))
        saved_world = int(ckpt.get("world_size", world_size))
        if batch and saved_world != world_size:
            logger.warning("the checkpoint was written mid-epoch by %d processes, this run has %d: epoch %d "
                           "restarts from its first batch", saved_world, world_size, epoch)
            batch = 0
        sampler = ckpt.get("sampler") or {}
        if sampler and int(sampler.get("seed", seed)) != int(seed):
            logger.warning("the checkpoint's SEED is %s, this run's %s: the data order differs from the "
                           "interrupted run's", sampler.get("seed"), seed)
        rng = ckpt.get("rng")
        if isinstance(rng, list) and len(rng) == world_size:
            set_rng_state(rng[rank])
        elif isinstance(rng, dict):
            set_rng_state(rng)
        elif rng:
            logger.warning("checkpoint holds RNG states of %d processes, this run has %d: RNG not restored",
                           len(rng), world_size)
        best = float(ckpt.get(self.best_key, 0.0))
        self.last_saved = f"epoch {epoch}, batch {batch}, global step {state.global_step}"
        logger.info("resumed from %s: epoch %d, global step %d, batch %d of the epoch, lr %.6g, %s %.4g",
                    self.resume_file, epoch, state.global_step, batch, optimizer.param_groups[0]["lr"],
                    self.best_key, best)
        return epoch, batch, best

    # ---------------------------------------------------------------- messages
    def interrupted(self, stopper: GracefulStop, saved: Optional[str]) -> TrainingInterrupted:
        """Log how to resume after a stop signal and return the exception to raise."""
        what = f"saved {self.describe_latest()}" if saved else f"the latest checkpoint is {self.describe_latest()}"
        msg = (f"stopped by {stopper.name or 'a signal'}: {what}. To resume, run the same command with "
               f"TRAIN.RESUME True: {resume_command()}")
        logger.error("%s", msg)
        return TrainingInterrupted(msg, stopper.signum or signal.SIGTERM)

    def diverged(self, err: TrainingDiverged) -> TrainingDiverged:
        """Log the divergence with the checkpoint to go back to and return the exception to raise."""
        msg = (f"{err} The last checkpoint from before the trouble is {self.describe_latest()}; it was left "
               f"intact. Resume from it with a lower TRAIN.LR: {resume_command()}")
        logger.error("%s", msg)
        return TrainingDiverged(msg)
