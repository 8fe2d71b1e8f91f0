"""The files of a training run, one scheme for every task (rank 0 writes, atomically):

=============================  ==================================================================
``checkpoint.pth.tar``         the latest full training state: written after every epoch and when a
                               stop signal ends the run mid-epoch; what ``TRAIN.RESUME`` continues
``checkpoint_ep{N:04d}.pth.tar``  the last ``TRAIN.KEEP_CHECKPOINTS`` epoch copies (when > 1)
``checkpoint_healthy.pth.tar`` the latest state from before an epoch the health check found
                               unhealthy (kept until a healthy epoch comes back)
``model_best.pth.tar``         ``{"model", "epoch", "best_metric", "best_mode", <metric>, "config"}``:
                               the weights of the best held-out score (the highest, or with
                               ``best_mode`` ``"min"`` the lowest); never replaced by a worse one
``final_state.pth``            the final weights as a bare state dict (as the original MDEQ / HRNet)
``results.json``               the final held-out metrics, counters, wall time; the code's commit
                               and the machine (:mod:`mdeq.utils.provenance`)
``history.jsonl``              one line per finished epoch: its training means (loss, metrics,
                               solver statistics), held-out scalars, step and time (what
                               ``tools/plot_training.py`` draws); a resumed run drops the lines
                               of the epochs it trains again
``run.lock``                   while a training run is on: its owner (:mod:`mdeq.utils.run_lock`)
=============================  ==================================================================

A training state holds the model, optimizer, scheduler and AMP scaler states, the position
(``epoch``, ``batch_in_epoch``: the next batch to run), the loop's counters, the best metric, the
config, every rank's RNG states (Python, NumPy, torch, CUDA), the sampler's seed and the state of
the health check, so that a resumed run continues exactly (same batches in the same order, same
random numbers). It is never written while steps are being skipped or with non-finite weights.
Files of earlier versions (``best_acc`` / ``best_miou`` entries, ``best.pth``) still load.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn
import yaml

from ..utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from ..utils.distributed import all_gather_object, unwrap
from ..utils.output_files import append_text, copy_file, write_bytes, write_json
from ..utils.optim import current_lr, load_scheduler_state, total_iterations
from ..utils.rng import get_rng_state, set_rng_state
from .signals import GracefulStop, TrainingInterrupted, resume_command
from .state import ResumableSampler, TrainState
from .step_guard import TrainingDiverged

logger = logging.getLogger(__name__)

LATEST = "checkpoint.pth.tar"
EPOCH_PREFIX = "checkpoint_ep"
HEALTHY = "checkpoint_healthy.pth.tar"
BEST = "model_best.pth.tar"
FINAL = "final_state.pth"
RESULTS = "results.json"
HISTORY = "history.jsonl"
FORMAT_VERSION = 3
_OLD_BEST_KEYS = ("best_acc", "best_miou")  # format 2 named the best metric per task
#: whether a task's best metric is maximised (a score) or minimised (an error, a loss)
BEST_MODES = ("max", "min")


def check_best_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`BEST_MODES`.

    Raises:
        ValueError: it is not (the message names it).
    """
    if mode not in BEST_MODES:
        raise ValueError(f"best_mode {mode!r}: choose 'max' (a score to maximise) or 'min' (an error to minimise)")
    return mode


def worst_score(mode: str) -> float:
    """The starting best of a run: every finite score beats it."""
    return float("-inf") if check_best_mode(mode) == "max" else float("inf")


def is_better(value: float, best: float, mode: str) -> bool:
    """Whether ``value`` beats ``best`` under ``mode`` (NaN never does)."""
    if value != value:
        return False
    return value > best if mode == "max" else value < best


def _saved_batch_size(config_text: Any) -> Optional[int]:
    """TRAIN.BATCH_SIZE_PER_GPU of a checkpoint's saved config (None when it cannot be read)."""
    try:
        value = yaml.safe_load(config_text)["TRAIN"]["BATCH_SIZE_PER_GPU"]
        return int(value)
    except (yaml.YAMLError, TypeError, KeyError, ValueError):
        return None


def model_files(cfg, out_dir: str, several: bool = False) -> List[str]:
    """The checkpoints an evaluation loads: TEST.MODEL_FILE (``--testModel``; with ``several``, a
    comma-separated list) or else the run's final weights in ``out_dir``.

    Raises:
        FileNotFoundError: one of them does not exist (a folder or another kind of file is left to
            :func:`~mdeq.utils.checkpoint.load_checkpoint`, which says what it is).
    """
    text = cfg.TEST.MODEL_FILE or os.path.join(out_dir, FINAL)
    files = [p for p in text.split(",") if p] if several else [text]
    for path in files:
        if not os.path.exists(path):
            raise FileNotFoundError(f"no model to evaluate: {path} does not exist (give --testModel FILE or "
                                    f"TEST.MODEL_FILE, or train first so that {FINAL} exists)")
    return files


def params_finite(model: nn.Module) -> bool:
    """Whether every floating-point parameter and buffer of ``model`` is finite."""
    return all(bool(torch.isfinite(t).all().item()) for t in unwrap(model).state_dict().values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def resume_checkpoint(out_dir: str, cfg, is_main: bool, device: Any) -> Optional[Dict[str, Any]]:
    """Before anything is written or read: the training state to resume from, or None for a fresh run.

    Removes stale temporary files of interrupted writes. ``TRAIN.RESUME`` resumes
    from ``TRAIN.CHECKPOINT`` (default: the run's ``checkpoint.pth.tar``).

    Raises:
        CheckpointError: a fresh run would overwrite an earlier run's checkpoint; or the file to resume
            from is truncated / refused / not a training state (the message names the epoch copies).
        FileNotFoundError: ``TRAIN.CHECKPOINT`` names a file that does not exist.
    """
    latest = os.path.join(out_dir, LATEST)
    resume_file = cfg.TRAIN.CHECKPOINT or latest
    if is_main and os.path.isdir(out_dir):
        for f in os.listdir(out_dir):
            if f.startswith(".tmp-"):   # the temporary files of output_files.replace_file (checkpoints, json)
                logger.warning("removing %s, the temporary file of a write that was interrupted",
                               os.path.join(out_dir, f))
                os.remove(os.path.join(out_dir, f))
    if not cfg.TRAIN.RESUME:
        if os.path.isfile(latest):
            raise CheckpointError(
                f"{latest} exists (an earlier run): starting afresh would overwrite it. Continue that run "
                f"with TRAIN.RESUME True, or choose another OUTPUT_DIR (--modelDir), or move the folder away.")
        return None
    if not os.path.isfile(resume_file):
        if resume_file != latest:
            raise FileNotFoundError(f"TRAIN.CHECKPOINT {resume_file} does not exist: give an existing "
                                    f"checkpoint, or leave TRAIN.CHECKPOINT empty to resume from {latest}")
        logger.warning("TRAIN.RESUME is set but %s does not exist: starting from scratch", latest)
        return None
    try:
        ckpt = load_checkpoint(resume_file, map_location=device)
    except CheckpointError as e:
        copies = sorted((f for f in os.listdir(out_dir) if f.startswith(EPOCH_PREFIX) or f == HEALTHY),
                        reverse=True) if os.path.isdir(out_dir) else []
        weights = [f for f in (BEST, FINAL) if os.path.isfile(os.path.join(out_dir, f))]
        alt = (f" Other states in {out_dir}: {', '.join(copies)}; resume from one with TRAIN.CHECKPOINT "
               f"<file>." if copies else
               f" No other training state is in {out_dir} (TRAIN.KEEP_CHECKPOINTS > 1 keeps epoch copies): move "
               f"{resume_file} away and train afresh without TRAIN.RESUME"
               + (f", starting from the weights of {' or '.join(weights)} with TRAIN.MODEL_FILE <file>."
                  if weights else "."))
        raise CheckpointError(f"cannot resume: {e}.{alt}") from e
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "epoch"} <= set(ckpt):
        raise CheckpointError(f"cannot resume from {resume_file}: it is not a training checkpoint (no "
                              f"model / optimizer / epoch entries); use TRAIN.MODEL_FILE to load weights only")
    ckpt["_path"] = resume_file
    return ckpt


class CheckpointManager:
    """Saves and restores the full training state of one run; owns every file of the run folder.

    Args:
        out_dir: the run's output folder.
        cfg: the run's config (TRAIN.KEEP_CHECKPOINTS; saved in every file).
        is_main: whether this process writes files.
        best_metric: the name of the held-out score that decides ``model_best`` (``'top1'``, ``'miou'``).
        model, optimizer, scheduler, scaler, sampler, state: the objects whose state is saved; the
            model may be DDP-wrapped, scheduler / scaler may be None.
        stateful: further objects with ``state_dict()`` / ``load_state_dict()`` (the health check).
        world_size: processes in this run.
        steps_per_epoch: optimiser steps in one of this run's epochs (0: unknown); saved, and compared
            with the checkpoint's on resume.
        best_mode: ``"max"`` (default) or ``"min"``: whether a higher or a lower ``best_metric`` is better.

    Raises:
        ValueError: ``best_mode`` is neither.
    """

    def __init__(self, out_dir: str, cfg, is_main: bool, best_metric: str, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any, sampler: ResumableSampler,
                 state: TrainState, stateful: Optional[Mapping[str, Any]] = None, world_size: int = 1,
                 steps_per_epoch: int = 0, best_mode: str = "max") -> None:
        self.out_dir, self.cfg, self.is_main = out_dir, cfg, is_main
        self.best_metric, self.best_mode = best_metric, check_best_mode(best_mode)
        self.best = worst_score(best_mode)
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, scaler
        self.sampler, self.state, self.stateful = sampler, state, dict(stateful or {})
        self.world_size, self.steps_per_epoch = int(world_size), int(steps_per_epoch)
        self.keep = int(cfg.TRAIN.KEEP_CHECKPOINTS)
        self.latest = os.path.join(out_dir, LATEST)
        self.last_saved: Optional[str] = None  # what the latest file holds, for the messages
        self.keeping_healthy = False

    def path(self, name: str) -> str:
        return os.path.join(self.out_dir, name)

    # ---------------------------------------------------------------- saving
    def _training_state(self, epoch: int, batch_in_epoch: int, rng_all: List[Any]) -> Dict[str, Any]:
        st = self.state
        ckpt: Dict[str, Any] = {
            "format_version": FORMAT_VERSION, "model": unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(), "epoch": int(epoch), "batch_in_epoch": int(batch_in_epoch),
            "global_step": int(st.global_step), "bad_steps": int(st.bad_steps), "skipped_steps": int(st.skipped_steps),
            "best_metric": self.best_metric, "best_mode": self.best_mode, "best": float(self.best),
            "config": self.cfg.dump(), "rng": rng_all, "world_size": self.world_size,
            "steps_per_epoch": self.steps_per_epoch, "lr": current_lr(self.optimizer), "sampler": self.sampler.state(),
        }
        if batch_in_epoch and st.epoch_partial is not None:
            ckpt["epoch_partial"] = st.epoch_partial
        if self.scheduler is not None:
            ckpt["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            ckpt["scaler"] = self.scaler.state_dict()
        for name, obj in self.stateful.items():
            ckpt[name] = obj.state_dict()
        return ckpt

    def save_latest(self, epoch: int, batch_in_epoch: int, epoch_end: bool) -> Optional[str]:
        """Write the training state as ``checkpoint.pth.tar`` (and, at an epoch end, as an epoch copy).

        Call on every rank (the RNG states are gathered). Refused (logged, returns None) while steps
        are being skipped or when a weight is not finite: the last checkpoint from before the
        trouble stays. Returns the path written (on every rank) or None.
        """
        where = f"epoch {epoch}, batch {batch_in_epoch}, global step {self.state.global_step}"
        rng_all = all_gather_object(get_rng_state())  # the one collective here: every rank calls save_latest
        why = self.saveable()
        if why is not None:
            logger.warning("not saving a checkpoint at %s: %s; %s keeps %s", where, why, self.latest,
                           self.last_saved or "the state from before the trouble")
            return None
        if self.is_main:
            ckpt = self._training_state(epoch, batch_in_epoch, rng_all)
            save_checkpoint(ckpt, self.latest)
            if epoch_end and self.keep > 1:
                save_checkpoint(ckpt, self.path(f"{EPOCH_PREFIX}{int(epoch):04d}.pth.tar"))
                self._prune()
            logger.info("checkpoint saved: %s (%s)", self.latest, where)
        self.last_saved = where
        return self.latest

    def saveable(self) -> Optional[str]:
        """Why the current state must not be saved (steps being skipped, weights not finite), or None."""
        if self.state.bad_steps > 0:
            return f"the last {self.state.bad_steps} steps were skipped"
        return None if params_finite(self.model) else "some weights are not finite"

    def append_history(self, epoch: int, seconds: float, eval_seconds: float, train: Mapping[str, float],
                       held_out: Mapping[str, float], mode: Optional[str] = None) -> None:
        """One line of ``history.jsonl`` for the finished ``epoch`` (main process only): ``seconds`` the
        epoch took, ``eval_seconds`` of them in the held-out evaluation, ``mode`` what its last training
        step computed ('unrolled', 'equilibrium' or 'explicit'; None: no step)."""
        if not self.is_main:
            return
        line = {"epoch": int(epoch), "global_step": int(self.state.global_step), "epoch_time_s": float(seconds),
                "eval_time_s": float(eval_seconds), "mode": mode, "train": {k: float(v) for k, v in train.items()},
                "held_out": dict(held_out)}
        append_text(self.path(HISTORY), json.dumps(line, allow_nan=True) + "\n")

    def _trim_history(self, begin_epoch: int) -> None:
        """Drop the history lines of epochs >= ``begin_epoch`` (a resumed run trains them again)."""
        path = self.path(HISTORY)
        if not (self.is_main and os.path.isfile(path)):
            return
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln).get("epoch", 0) < begin_epoch]
        if len(kept) != len(lines):
            write_bytes(path, "".join(kept).encode())

    def keep_healthy_copy(self) -> Optional[str]:
        """Before an unhealthy epoch's state overwrites the latest checkpoint: keep the latest one as
        ``checkpoint_healthy.pth.tar`` (once per unhealthy stretch). Returns its path, if there is one, on
        the main process (the one that writes it); None on the others."""
        target = self.path(HEALTHY)
        if not self.keeping_healthy and self.is_main and os.path.isfile(self.latest):
            copy_file(self.latest, target)
        self.keeping_healthy = True
        return target if self.is_main and os.path.isfile(target) else None

    def healthy_again(self) -> None:
        self.keeping_healthy = False

    def _prune(self) -> None:
        copies = sorted(f for f in os.listdir(self.out_dir) if f.startswith(EPOCH_PREFIX) and f.endswith(".pth.tar"))
        for f in copies[:max(0, len(copies) - self.keep)]:
            os.remove(self.path(f))

    def update_best(self, value: float, epoch: int) -> bool:
        """Record a held-out score; a better one (higher, or lower with ``best_mode`` ``"min"``; NaN
        never is) is saved as ``model_best.pth.tar``."""
        if not is_better(value, self.best, self.best_mode):
            return False
        self.best = float(value)
        if self.is_main:
            save_checkpoint({"model": unwrap(self.model).state_dict(), "epoch": int(epoch) + 1,
                             "best_metric": self.best_metric, "best_mode": self.best_mode,
                             self.best_metric: self.best, "config": self.cfg.dump()}, self.path(BEST))
            logger.info("new best %s %.4f (epoch %d, %s is better) -> %s", self.best_metric, value, epoch,
                        "higher" if self.best_mode == "max" else "lower", self.path(BEST))
        return True

    def save_final(self, results: Dict[str, Any]) -> None:
        """``final_state.pth`` (bare state dict) and ``results.json``."""
        if not self.is_main:
            return
        save_checkpoint(unwrap(self.model).state_dict(), self.path(FINAL))
        write_json(self.path(RESULTS), results, indent=2, allow_nan=True)

    # ---------------------------------------------------------------- resuming
    def restore(self, ckpt: Dict[str, Any], seed: int, rank: int) -> Tuple[int, int]:
        """Load ``ckpt`` (from :func:`resume_checkpoint`) into the objects; returns ``(epoch, batch_in_epoch)``.

        Raises:
            CheckpointError: the checkpoint's model or optimizer does not fit this run.
        """
        src = ckpt.get("_path", "the checkpoint")
        try:
            unwrap(self.model).load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise CheckpointError(f"cannot resume from {src}: its model does not fit this config "
                                  f"(another architecture?): {e}") from e
        self._restore_optimizer(ckpt, src)
        st = self.state
        st.global_step, st.bad_steps, st.skipped_steps = (int(ckpt.get(k, 0)) for k in
                                                          ("global_step", "bad_steps", "skipped_steps"))
        st.epoch_partial = ckpt.get("epoch_partial") if ckpt.get("batch_in_epoch") else None
        for name, obj in self.stateful.items():
            if ckpt.get(name) is not None:
                obj.load_state_dict(ckpt[name])
        epoch, batch = int(ckpt["epoch"]), int(ckpt.get("batch_in_epoch", 0))
        batch = self._check_epoch_length(ckpt, epoch, batch)
        saved_seed = (ckpt.get("sampler") or {}).get("seed", seed)
        if int(saved_seed) != int(seed):
            logger.warning("the checkpoint's SEED is %s, this run's %s: the data order differs from the "
                           "interrupted run's", saved_seed, seed)
        self._restore_rng(ckpt.get("rng"), rank)
        self.best = self._resumed_best(ckpt, src)
        self._trim_history(epoch)
        self.last_saved = f"epoch {epoch}, batch {batch}, global step {st.global_step}"
        logger.info("resumed from %s: epoch %d, global step %d, batch %d of the epoch, lr %.6g, best %s %s",
                    src, epoch, st.global_step, batch, current_lr(self.optimizer), self.best_metric,
                    f"{self.best:.4g}" if math.isfinite(self.best) else "none yet")
        return epoch, batch

    def _check_epoch_length(self, ckpt: Dict[str, Any], epoch: int, batch: int) -> int:
        """Warn in one line when the checkpoint's run had another batch size, number of processes or
        epoch length, saying what follows; returns the batch of the epoch to resume at (its first
        when the checkpoint is mid-epoch: its batch index counts batches of the other size)."""
        saved_bs = _saved_batch_size(ckpt.get("config"))
        was = {"TRAIN.BATCH_SIZE_PER_GPU": saved_bs, "processes": ckpt.get("world_size"),
               "steps per epoch": ckpt.get("steps_per_epoch") or None}
        now = {"TRAIN.BATCH_SIZE_PER_GPU": int(self.cfg.TRAIN.BATCH_SIZE_PER_GPU), "processes": self.world_size,
               "steps per epoch": self.steps_per_epoch or None}
        changed = [f"{k} {was[k]} -> {now[k]}" for k in was
                   if was[k] is not None and now[k] is not None and int(was[k]) != int(now[k])]
        if not changed:
            return batch
        where = (f"epoch {epoch} restarts from its first batch (the checkpoint's batch {batch} counted batches "
                 f"of the other size)" if batch else f"training continues with epoch {epoch}")
        schedule = ""
        if self.steps_per_epoch:
            end = self.state.global_step + max(0, self.cfg.TRAIN.END_EPOCH - epoch) * self.steps_per_epoch
            schedule = (f"; the LR schedule, a function of the global step, goes on from step "
                        f"{self.state.global_step} and ends at step {end} where this run's epochs plan "
                        f"{total_iterations(self.cfg, self.steps_per_epoch)}")
        logger.warning("resuming a run with another epoch length (%s): %s%s; scores and losses per epoch are "
                       "not comparable across the change", ", ".join(changed), where, schedule)
        return 0

    def _resumed_best(self, ckpt: Dict[str, Any], src: str) -> float:
        """The better of the checkpoint's best and the score in the run's ``model_best.pth.tar``: an
        epoch copy may predate model_best, and the best never goes back to a worse score. A best
        kept under the other ``best_mode`` is dropped (with a warning): it is no score to beat."""
        worst = worst_score(self.best_mode)
        best = ckpt.get("best", next((ckpt[k] for k in _OLD_BEST_KEYS if k in ckpt), worst))
        saved_mode = ckpt.get("best_mode", "max")   # files before best_mode maximised
        if saved_mode != self.best_mode:
            logger.warning("%s kept its best %s with best_mode %r, this run's task has %r: the best starts afresh",
                           src, ckpt.get("best_metric", self.best_metric), saved_mode, self.best_mode)
            best = worst
        saved = self._saved_best()
        return saved if is_better(saved, float(best), self.best_mode) else float(best)

    def _saved_best(self) -> float:
        """The score recorded in the run's ``model_best.pth.tar`` (the worst score of ``best_mode`` when
        there is none, it is unreadable or it was kept under the other mode)."""
        path, worst = self.path(BEST), worst_score(self.best_mode)
        if not os.path.isfile(path):
            return worst
        try:
            entry = load_checkpoint(path)
            score = float(entry.get(entry.get("best_metric", self.best_metric), worst))
        except (CheckpointError, AttributeError, TypeError, ValueError) as e:
            logger.warning("cannot read the score of %s (%s): a better held-out score will replace it", path, e)
            return worst
        if entry.get("best_mode", "max") != self.best_mode:
            logger.warning("%s holds a best kept with best_mode %r, this run's task has %r: a better held-out "
                           "score will replace it", path, entry.get("best_mode", "max"), self.best_mode)
            return worst
        return score

    def _restore_optimizer(self, ckpt: Dict[str, Any], src: str) -> None:
        saved_keys = set((ckpt["optimizer"].get("param_groups") or [{}])[0]) - {"initial_lr"}
        own_keys = set(self.optimizer.state_dict()["param_groups"][0]) - {"initial_lr"}
        if saved_keys != own_keys:
            raise CheckpointError(f"cannot resume from {src}: its optimizer has the settings {sorted(saved_keys)}, "
                                  f"this run's {type(self.optimizer).__name__} {sorted(own_keys)}; resume with "
                                  f"the TRAIN.OPTIMIZER of the interrupted run")
        self.optimizer.load_state_dict(ckpt["optimizer"])
        sched = self.scheduler
        if sched is not None and ckpt.get("scheduler") is not None:
            base_lrs = list(getattr(sched, "base_lrs", []))  # from this run's TRAIN.LR
            load_scheduler_state(sched, ckpt["scheduler"])
            if base_lrs and base_lrs != list(sched.base_lrs):
                logger.warning("TRAIN.LR differs from the checkpoint's (%s -> %s): the schedule continues from "
                               "step %d with the new base rate", sched.base_lrs, base_lrs, sched.last_epoch)
                sched.base_lrs = base_lrs
                load_scheduler_state(sched, sched.state_dict())  # re-sync the optimizer's rates
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])

    def _restore_rng(self, rng: Any, rank: int) -> None:
        if isinstance(rng, list) and len(rng) == self.world_size:
            set_rng_state(rng[rank])
        elif isinstance(rng, dict):
            set_rng_state(rng)
        elif rng:
            logger.warning("checkpoint holds RNG states of %d processes, this run has %d: RNG not restored",
                           len(rng), self.world_size)

    # ---------------------------------------------------------------- messages
    def describe_latest(self) -> str:
        """``'<path> (epoch E, batch B, global step S)'`` of the latest checkpoint, or a note that none exists."""
        if self.last_saved:
            return f"{self.latest} ({self.last_saved})"
        return f"none yet ({self.latest} was never written: a resumed run starts from scratch)"

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
