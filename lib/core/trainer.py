"""The one training engine of mdeq: :func:`train_one_epoch` and :func:`fit`, used by every task.

A :class:`Task` (classification: :mod:`mdeq.tasks.classification`, segmentation:
:mod:`mdeq.tasks.segmentation`) supplies only what differs: its datasets, model, criterion, its
forward and loss of a training batch (:meth:`Task.forward_loss`, by default the model and the
criterion), the metrics of a training batch, the held-out evaluation and its best metric (its name,
and whether it is maximised or minimised). Everything else is decided here, once:

* **Warm-up.** Each step passes the global step to the model (``train_step``); its equilibrium
  layer (:class:`~mdeq.modules.EquilibriumLayer`) runs the unrolled weight-tied stack while it is
  below ``TRAIN.PRETRAIN_STEPS``, afterwards the equilibrium solver with its backward, and says
  which in the step's :class:`~mdeq.modules.EquilibriumInfo`. With ``MODEL.SOFTPLUS_WARMUP`` f
  uses softplus during the first ``TRAIN.SOFTPLUS_EPOCHS`` epochs. The baselines have no warm-up
  (their ``forward_kind``, :func:`mdeq.models.forward_kind`, is ``'unrolled'`` or ``'explicit'``):
  their steps report no solver statistics, and what judges a solver (the residual and fallback
  health checks, the solver divergence guard) finds nothing to judge in them.
* **Bad steps.** A step whose loss or gradient is not finite, or whose forward solver hit its
  divergence guard, on any rank, is skipped by every rank (:class:`~mdeq.core.step_guard.StepGuard`):
  no rank runs backward for a bad forward, no rank updates for a bad gradient, so the replicas stay
  identical. A skipped step still counts: it advances the global step and the LR schedule, which
  stay tied to the batches consumed (the schedule ends at ``TRAIN.END_EPOCH`` whatever was
  skipped, and the resume position is exact). ``TRAIN.MAX_BAD_STEPS`` in a row stop the run.
* **Health.** Each epoch is judged (:class:`~mdeq.core.health.HealthMonitor`); an unhealthy one
  is logged with its numbers, keeps the last healthy checkpoint, and with
  ``TRAIN.STOP_ON_UNHEALTHY`` stops the run as divergence does.
* **Signals, checkpoints, resume**: :mod:`mdeq.core.signals`, :mod:`mdeq.core.checkpoint_manager`.
* **Logs.** A line every ``PRINT_FREQ`` steps (``epoch E [i/n] step S loss L ...``) and per epoch;
  TensorBoard scalars at the step that produced them (``train/*``, ``solver/*``, ``valid/*``); a
  progress bar on a terminal only. The Lipschitz MDEQ's certified bound at every logged step
  (``lipschitz/certified``) and, per epoch, with its empirical estimate (``lipschitz_certified``,
  ``lipschitz_empirical`` in the epoch line, ``history.jsonl`` and ``train_epoch/*``).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..config import ConfigError
from ..models import forward_kind
from ..models.inference import evaluation_model
from ..models.layout import training_layout
from ..modules import LOGGED_KEYS, EquilibriumInfo
from ..utils.distributed import DistInfo, all_gather_object, barrier, unwrap
from ..utils.event_log import ScalarEvents
from ..utils.logger import progress_bar
from ..utils.optim import build_optimizer, build_scheduler, current_lr
from ..utils.precision import autocast_dtype
from ..utils.provenance import run_provenance
from .checkpoint_manager import CheckpointManager, check_best_mode, resume_checkpoint
from .health import ADVICE, HealthMonitor
from .reduce import Reducer
from .regularization import JacobianRegularizer
from .signals import GracefulStop, TrainingInterrupted
from .state import TrainState, make_loader, start_epoch
from .step_guard import StepGuard, TrainingDiverged, grad_norm_of

logger = logging.getLogger(__name__)

# Every rank raises these at the same step (the decisions are all-reduced), so the ranks can still
# meet at a barrier before the process group goes.
STOPPED_TOGETHER = (TrainingInterrupted, TrainingDiverged)


class Task:
    """What a task supplies to the engine; subclasses override what differs from these defaults."""

    #: shown in the logs
    name = "task"
    #: the key of :meth:`evaluate`'s result that decides ``model_best.pth.tar``
    best_metric = "score"
    #: ``"max"``: a higher :attr:`best_metric` is better (a score); ``"min"``: a lower one (an error)
    best_mode = "max"
    #: drop the last incomplete training batch (batch norm on a batch of one is undefined)
    drop_last = False

    def build_model(self, cfg, initial_weights: bool) -> nn.Module:
        """The model on the CPU; with ``initial_weights``, a training run's starting weights loaded
        (TRAIN.MODEL_FILE, MODEL.PRETRAINED ...). Its call is ``model(images, train_step=..., jac_loss=...,
        return_info=True) -> (output, EquilibriumInfo)``; a model without an equilibrium says so in its
        ``forward_kind`` (see :func:`mdeq.models.forward_kind`)."""
        raise NotImplementedError

    def build_datasets(self, cfg) -> Tuple[Dataset, Optional[Dataset]]:
        """(training set, held-out set or None)."""
        raise NotImplementedError

    def build_criterion(self, cfg) -> nn.Module:
        raise NotImplementedError

    def selection_warning(self, cfg) -> Optional[str]:
        """A warning for the start of training when the held-out set that picks ``model_best`` is a test
        set (its score then no unbiased estimate); None when it is not."""
        return None

    def prepare_distributed(self, model: nn.Module, info: DistInfo) -> nn.Module:
        """A chance to convert layers before DDP wraps the model (e.g. SyncBatchNorm)."""
        return model

    def unpack(self, batch: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        """(images, targets) of a loader batch."""
        return batch[0], batch[1]

    def forward_loss(self, model: nn.Module, criterion: nn.Module, images: torch.Tensor, target: torch.Tensor, *,
                     train_step: int, jac_loss: bool) -> Tuple[torch.Tensor, torch.Tensor, EquilibriumInfo]:
        """(output, task loss, the equilibrium's info) of a training batch, run under the step's autocast.

        ``train_step`` (the global step) lets the model's equilibrium layer choose the warm-up or the
        equilibrium; ``jac_loss`` asks it for the Jacobian term (``info.jac_loss``).
        """
        output, info = model(images, train_step=train_step, jac_loss=jac_loss, return_info=True)
        return output, criterion(output.float(), target), info

    def batch_metrics(self, output: torch.Tensor, target: torch.Tensor) -> Dict[str, float]:
        """Sums over the batch of per-sample training metrics (the epoch reports sum / samples)."""
        return {}

    def evaluate(self, model: nn.Module, loader: DataLoader, cfg, info: DistInfo) -> Dict[str, Any]:
        """Held-out evaluation (every rank its shard, results reduced); must contain :attr:`best_metric`."""
        raise NotImplementedError

    def describe(self, result: Dict[str, Any]) -> str:
        """The evaluation as text for the log."""
        return " ".join(f"{k} {v:.4g}" for k, v in self.scalars(result).items())

    def scalars(self, result: Dict[str, Any]) -> Dict[str, float]:
        """The numbers of an evaluation that go to TensorBoard and results.json."""
        return {k: float(v) for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def health_problem(self, cfg, train: Dict[str, float], val: Dict[str, Any]) -> Optional[str]:
        """A task's own sign that an epoch with equilibrium steps went bad (None: none seen)."""
        return None

    def summary(self, model: nn.Module, cfg) -> Dict[str, Any]:
        """Facts about the model for results.json (parameter count, FLOPs ...)."""
        return {}


@dataclass
class Run:
    """The objects of one training run, built by :func:`build_run`."""

    cfg: Any
    info: DistInfo
    task: Task
    model: nn.Module            # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Optional[torch.amp.GradScaler]   # float16 autocast only (see amp_setup)
    criterion: nn.Module
    loader: DataLoader
    val_loader: Optional[DataLoader]
    state: TrainState = field(default_factory=TrainState)
    health: HealthMonitor = field(default_factory=HealthMonitor)
    regularizer: JacobianRegularizer = field(default_factory=JacobianRegularizer)
    writer: Any = None
    amp_dtype: Optional[torch.dtype] = None  # autocast's dtype; None: float32
    last_mode: Optional[str] = None           # the mode ('unrolled' / 'equilibrium') of the last step
    last_images: Optional[torch.Tensor] = None  # the last training batch (the Lipschitz MDEQ's empirical probe)

    @property
    def net(self) -> nn.Module:
        return unwrap(self.model)


# ------------------------------------------------------------------------------------------ one step
@dataclass
class StepResult:
    loss: float                  # nan when skipped
    skipped: bool
    equilibrium: EquilibriumInfo  # with the backward's statistics once it ran
    grad_norm: Optional[float]
    lr: float                    # the rate this step used
    metrics: Dict[str, float]
    samples: int


def train_step(run: Run, images: torch.Tensor, target: torch.Tensor, epoch: int, guard: StepGuard) -> StepResult:
    """Forward, guard, backward, update for one batch; advances the global step and the schedule."""
    step, device = run.state.global_step, images.device
    run.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        output, task_loss, info = run.task.forward_loss(run.model, run.criterion, images, target, train_step=step,
                                                        jac_loss=run.regularizer.active(step))
    run.last_mode = info.mode
    loss = run.regularizer.add(task_loss, info, epoch)   # + the Jacobian term, when asked for
    reason = guard.forward_problem(loss, info)
    grad_norm = None
    if reason is None:
        if run.scaler is not None:
            run.scaler.scale(loss).backward()
            run.scaler.unscale_(run.optimizer)
        else:
            loss.backward()
        grad_norm = grad_norm_of(run.model, run.cfg.TRAIN.CLIP)
        if run.scaler is None:  # the scaler skips non-finite steps itself (and lowers its scale)
            reason = guard.gradient_problem(grad_norm)
    lr = current_lr(run.optimizer)
    if reason is None:
        if run.scaler is not None:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        guard.good()
    else:
        run.optimizer.zero_grad(set_to_none=True)
        guard.bad(reason, epoch, step, loss, grad_norm, info)
    if run.scheduler is not None:
        run.scheduler.step()
    run.state.global_step += 1
    run.health.observe(info)
    if info.jac_loss is not None:  # the result outlives the step: keep the number, not the graph of f
        info.jac_loss = info.jac_loss.detach()
    metrics = run.task.batch_metrics(output.detach().float(), target)
    return StepResult(float("nan") if reason else task_loss.item(), reason is not None, info, grad_norm, lr,
                      metrics, int(target.shape[0]))


# ------------------------------------------------------------------------------------------ one epoch
class EpochMeter:
    """Sums of a training epoch, reduced over the processes at the end: the loss over the steps not
    skipped, the task's metrics per sample, the solver statistics per step that reported them."""

    _METRIC = "metric:"   # the task's metric names, kept apart from the meter's own sums

    def __init__(self, carried: Optional[Dict[str, Any]] = None) -> None:
        self.reducer = Reducer(sums=("loss", "good", "samples"), means=LOGGED_KEYS)
        if carried:  # the totals of the epoch's part before an interruption (TrainState.epoch_partial)
            self.reducer.carry(carried)

    def update(self, r: StepResult) -> None:
        good = not r.skipped
        sums = {"loss": r.loss if good else 0.0, "good": float(good), "samples": r.samples}
        sums.update({self._METRIC + k: v for k, v in r.metrics.items()})
        self.reducer.add(sums, r.equilibrium.scalars())

    def reduce(self, device: torch.device) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """(the epoch's means over every process, its totals as :meth:`Totals.state` for a checkpoint)"""
        tot = self.reducer.reduce(device)
        out = {"loss": tot.ratio("loss", "good"), "steps": int(tot.sums["good"])}
        out.update({k[len(self._METRIC):]: tot.ratio(k, "samples") for k in sorted(tot.sums)
                    if k.startswith(self._METRIC)})
        return {**out, **tot.means}, tot.state()


def _report_step(run: Run, epoch: int, i: int, total: int, step: int, r: StepResult, bar: Any) -> None:
    if not run.info.is_main:
        return
    scalars = r.equilibrium.scalars()
    bar.set_postfix({"loss": f"{r.loss:.4f}", "f": f"{scalars.get('f_steps', 0):.0f}", "lr": f"{r.lr:.2e}",
                     **({"jac": f"{scalars['jac_loss']:.3g}"} if "jac_loss" in scalars else {})}, refresh=False)
    if step % max(1, run.cfg.PRINT_FREQ) and i != total - 1:
        return
    extra = " ".join(f"{k} {v / max(1, r.samples):.4g}" for k, v in r.metrics.items())
    logger.info("epoch %d [%d/%d] step %d loss %.6f %slr %.4g %s", epoch, i, total, step, r.loss,
                f"{extra} " if extra else "", r.lr, r.equilibrium.describe())
    w = run.writer
    if w is not None:
        w.add_scalar("train/loss", r.loss, step)
        w.add_scalar("train/lr", r.lr, step)
        w.add_scalar("train/equilibrium", float(r.equilibrium.mode == "equilibrium"), step)
        if r.grad_norm is not None:
            w.add_scalar("train/grad_norm", r.grad_norm, step)
        for k, v in r.metrics.items():
            w.add_scalar(f"train/{k}", v / max(1, r.samples), step)
        for k, v in scalars.items():
            w.add_scalar(f"solver/{k}", v, step)
    for k, v in lipschitz_scalars(run).items():
        logger.info("step %d lipschitz_%s %.4f", step, k, v)
        if w is not None:
            w.add_scalar(f"lipschitz/{k}", v, step)


def lipschitz_scalars(run: Run, images: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """The Lipschitz MDEQ's ``certified`` bound of f and, given ``images`` (and MODEL.LIPSCHITZ.EMPIRICAL_ITERS
    > 0), the ``empirical`` one: the largest power-method estimate of ||J_f(z*)|| over them (docs/lipschitz.md).
    ``{}`` for any other model."""
    net = run.net
    if not getattr(net, "lipschitz", False):
        return {}
    cert = net.lipschitz_certificate()
    if cert.bound >= cert.target:
        logger.warning("the certified Lipschitz bound of f, %.4f, is not under MODEL.LIPSCHITZ.TARGET %.4g: a "
                       "convolution's power estimate, which sets its cap, lagged behind the optimiser (its vector is "
                       "re-seeded now), or its certified norm lies more than MODEL.LIPSCHITZ.CAP_MARGIN above the "
                       "estimate; a-priori step counts do not hold until it is back under", cert.bound, cert.target)
    out = {"certified": float(cert.bound)}
    iters = run.cfg.MODEL.LIPSCHITZ.EMPIRICAL_ITERS
    if images is not None and iters > 0:
        out["empirical"] = float(net.lipschitz_empirical(images, iters).max())
    return out


#: images of the empirical Lipschitz estimate per epoch
PROBE_IMAGES = 32


def _probe_images(run: Run) -> Optional[torch.Tensor]:
    """The images of the empirical Lipschitz estimate: the first :data:`PROBE_IMAGES` of the first held-out
    batch, else of the last training batch."""
    if run.val_loader is not None:
        images, _ = run.task.unpack(next(iter(run.val_loader)))
        return images[:PROBE_IMAGES].to(run.info.device)
    return None if run.last_images is None else run.last_images[:PROBE_IMAGES]


def train_one_epoch(run: Run, epoch: int, start_batch: int = 0, stopper: Optional[GracefulStop] = None
                    ) -> Dict[str, float]:
    """One pass over ``run.loader`` (from batch ``start_batch`` of the epoch, for a resumed run).

    Updates ``run.state`` in place: ``global_step``, the bad-step counters, ``batch_in_epoch``,
    ``stop`` when TRAIN.MAX_ITERS is reached, ``interrupted`` when ``stopper`` asked to stop (the
    epoch then ends at that step boundary). Returns the epoch's means over all processes: ``loss``
    (over the steps not skipped), ``steps``, the task's training metrics and the solver statistics.

    Raises:
        TrainingDiverged: TRAIN.MAX_BAD_STEPS consecutive steps were skipped.
    """
    cfg, state, device = run.cfg, run.state, run.info.device
    run.model.train()
    if cfg.MODEL.SOFTPLUS_WARMUP:
        run.net.set_softplus(epoch < cfg.TRAIN.SOFTPLUS_EPOCHS)
    guard = StepGuard(state, cfg.TRAIN.MAX_BAD_STEPS)
    # a resumed epoch goes on from its interrupted part's totals: they hold every process's share, so
    # the main process alone carries them
    carried = state.epoch_partial if start_batch else None
    state.epoch_partial = None
    meter = EpochMeter(carried["totals"] if carried and run.info.is_main else None)
    total = start_batch + len(run.loader)
    state.batch_in_epoch = start_batch
    bar = progress_bar(run.loader, enabled=run.info.is_main, total=len(run.loader), desc=f"train {epoch}")
    for i, batch in enumerate(bar, start=start_batch):
        if 0 <= cfg.TRAIN.MAX_ITERS <= state.global_step:
            state.stop = True
            break
        images, target = (t.to(device, non_blocking=True) for t in run.task.unpack(batch))
        step = state.global_step
        result = train_step(run, images, target, epoch, guard)
        run.last_images = images
        state.batch_in_epoch = i + 1
        meter.update(result)
        _report_step(run, epoch, i, total, step, result, bar)
        if stopper is not None and stopper.should_stop():
            state.interrupted = True
            break
    bar.close()
    out, totals = meter.reduce(device)
    if state.interrupted:   # its seconds are the caller's (_run_epoch), who times the whole epoch
        state.epoch_partial = {"totals": totals}
    out["lr"] = current_lr(run.optimizer)
    return out


# ------------------------------------------------------------------------------------------ the run
def build_run(task: Task, cfg, info: DistInfo, tb_dir: str, initial_weights: bool = True) -> Run:
    """Model, data, optimizer, schedule (per step), AMP scaler, criterion and TensorBoard writer;
    the model is not yet DDP-wrapped (a checkpoint is restored into it first). ``initial_weights``:
    load the configured starting weights (not when resuming: the checkpoint replaces them all)."""
    model = training_layout(task.build_model(cfg, initial_weights=initial_weights).to(info.device), cfg)
    train_set, val_set = task.build_datasets(cfg)
    loader = make_loader(train_set, cfg, info, train=True, drop_last=task.drop_last)
    if len(loader) == 0:
        raise ConfigError(f"the training set ({len(train_set)} samples) gives no full batch of "
                          f"TRAIN.BATCH_SIZE_PER_GPU = {cfg.TRAIN.BATCH_SIZE_PER_GPU} per process on "
                          f"{info.world_size} processes")
    val_loader = make_loader(val_set, cfg, info, train=False) if val_set is not None else None
    logger.info("%s: %d training samples (%d steps per epoch, global batch %d), %s held-out", task.name,
                len(train_set), len(loader), cfg.TRAIN.BATCH_SIZE_PER_GPU * info.world_size,
                "no" if val_set is None else len(val_set))
    selection = task.selection_warning(cfg) if val_set is not None else None
    if selection and info.is_main:
        logger.warning(selection)
    optimizer = build_optimizer(cfg, model)
    amp_dtype, scaler = amp_setup(bool(cfg.TRAIN.AMP), info.device)
    writer = None
    if info.is_main:
        writer = ScalarEvents(tb_dir)
    return Run(cfg=cfg, info=info, task=task, model=model, optimizer=optimizer,
               scheduler=build_scheduler(cfg, optimizer, len(loader)),
               scaler=scaler, criterion=task.build_criterion(cfg).to(info.device), loader=loader,
               val_loader=val_loader, regularizer=JacobianRegularizer.from_cfg(cfg), writer=writer,
               amp_dtype=amp_dtype)


def amp_setup(enabled: bool, device: torch.device) -> Tuple[Optional[torch.dtype], Optional[torch.amp.GradScaler]]:
    """The autocast dtype (:func:`~mdeq.utils.precision.autocast_dtype`) and, for float16 only, a loss scaler."""
    dtype = autocast_dtype(enabled, device)
    if enabled and dtype is None:
        logger.warning("TRAIN.AMP is set but %s has no fast half-precision type (a CPU needs AVX512-BF16 or "
                       "AMX): training in float32", device)
    return dtype, (torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)


def param_checksum(model: nn.Module) -> float:
    """Sum of all parameters in float64, to compare replicas across ranks (buffers such as batch-norm
    running statistics are left out: each rank updates them from its own batches)."""
    return float(sum(p.detach().double().sum().item() for p in unwrap(model).parameters()))


def _evaluate(run: Run, epoch: Optional[int]) -> Dict[str, Any]:
    if run.val_loader is None:
        return {}
    # the copy that the evaluation tools run (TEST.FOLD_BN, TEST.CHANNELS_LAST): the same figures, sooner
    res = run.task.evaluate(evaluation_model(run.net, run.cfg), run.val_loader, run.cfg, run.info)
    if run.writer is not None and epoch is not None:
        for k, v in run.task.scalars(res).items():
            run.writer.add_scalar(f"valid/{k}", v, run.state.global_step)
    return res


def _judge_health(run: Run, manager: CheckpointManager, epoch: int, train: Dict[str, float],
                  val: Dict[str, Any]) -> bool:
    """Warn about an unhealthy epoch (or stop, with TRAIN.STOP_ON_UNHEALTHY) before its state is saved;
    returns whether the epoch is healthy."""
    # the task's own sign is judged past the warm-up: on epochs with equilibrium steps, or on every
    # epoch of a model that never solves for an equilibrium (a baseline: its steps are all it is)
    judged = run.health.equilibrium_steps > 0 or forward_kind(run.net) != "equilibrium"
    problems, numbers = run.health.end_epoch(train["loss"], run.info.device)
    own = run.task.health_problem(run.cfg, train, val) if judged else None
    problems += [own] if own else []
    if not problems:
        manager.healthy_again()
        return True
    what = f"{'; '.join(problems)} ({numbers})"
    if run.cfg.TRAIN.STOP_ON_UNHEALTHY:
        raise TrainingDiverged(f"training is unhealthy at epoch {epoch} (TRAIN.STOP_ON_UNHEALTHY): {what}. "
                               f"To go on: {ADVICE}.")
    kept = manager.keep_healthy_copy()
    if run.info.is_main:    # every rank judges alike; only the main one keeps the copy and can name it
        logger.warning("epoch %d looks unhealthy: %s. To go on: %s; TRAIN.STOP_ON_UNHEALTHY True stops such a run. "
                       "The state from before this epoch is kept as %s.", epoch, what, ADVICE,
                       kept or "(no earlier checkpoint)")
    return False


def _run_epoch(run: Run, manager: CheckpointManager, epoch: int, start_batch: int, stopper: GracefulStop
               ) -> Dict[str, Any]:
    """Train one epoch, evaluate, judge, save; raises on a stop signal (after saving)."""
    partial = run.state.epoch_partial if start_batch else None
    t0 = time.time() - (partial["seconds"] if partial else 0.0)   # a resumed epoch's time includes its first part
    start_epoch(run.loader, epoch, start_batch, run.cfg.SEED, run.info.rank)
    tr = train_one_epoch(run, epoch, start_batch, stopper)
    if run.state.interrupted:  # SIGTERM / SIGINT: save where we are and leave
        run.state.epoch_partial["seconds"] = time.time() - t0
        saved = manager.save_latest(epoch, run.state.batch_in_epoch, epoch_end=False)
        barrier()
        raise manager.interrupted(stopper, saved)
    t_eval = time.time()
    val = _evaluate(run, epoch)
    t_eval = time.time() - t_eval
    # the Lipschitz MDEQ's bounds, logged with the epoch's training figures (and in history.jsonl)
    tr.update({f"lipschitz_{k}": v for k, v in lipschitz_scalars(run, _probe_images(run)).items()})
    train_metrics = " ".join(f"{k} {tr[k]:.4g}" for k in tr if k not in ("loss", "steps", "lr") + LOGGED_KEYS)
    solver = " ".join(f"{k} {tr[k]:.3g}" for k in LOGGED_KEYS if k in tr)
    logger.info("epoch %d (%s%s, %.0fs): train loss %.4f %s| %s | %s, lr %.3g, skipped steps %d", epoch,
                run.last_mode or "no steps", ", softplus" if run.cfg.MODEL.SOFTPLUS_WARMUP and
                epoch < run.cfg.TRAIN.SOFTPLUS_EPOCHS else "", time.time() - t0, tr["loss"],
                f"{train_metrics} " if train_metrics else "", run.task.describe(val) if val else "no held-out set",
                solver or "no solver statistics", tr["lr"], run.state.skipped_steps)
    if run.writer is not None:
        run.writer.add_scalar("train_epoch/loss", tr["loss"], epoch)
        for k in ("lipschitz_certified", "lipschitz_empirical"):
            if k in tr:
                run.writer.add_scalar(f"train_epoch/{k}", tr[k], epoch)
        run.writer.flush()
    healthy = _judge_health(run, manager, epoch, tr, val)
    # the best first, so that the epoch's checkpoint records a best that includes this epoch; an
    # unhealthy epoch, or one whose state cannot be saved, never becomes the best
    if val and healthy and manager.saveable() is None:
        manager.update_best(float(val.get(run.task.best_metric, float("nan"))), epoch)
    saved = manager.save_latest(epoch + 1, 0, epoch_end=True)
    if saved:
        manager.append_history(epoch, time.time() - t0, t_eval, tr, run.task.scalars(val) if val else {},
                               mode=run.last_mode)
    barrier()
    if stopper.should_stop():  # the signal came during validation: the epoch's checkpoint is saved
        raise manager.interrupted(stopper, saved)
    return val


def fit(task: Task, cfg, info: DistInfo, out_dir: str, tb_dir: str) -> Dict[str, Any]:
    """Train ``task`` from scratch or from the checkpoint to resume, evaluate, write the run's files
    (:mod:`mdeq.core.checkpoint_manager`); returns the final results (as in ``results.json``)."""
    start_time = time.time()
    check_best_mode(task.best_mode)   # a task's mistake, named before any data is read
    ckpt = resume_checkpoint(out_dir, cfg, info.is_main, info.device)  # a bad file fails before the data is read
    if info.is_main:
        logger.info("config:\n%s", cfg.dump())
    run = build_run(task, cfg, info, tb_dir, initial_weights=ckpt is None)
    manager = CheckpointManager(out_dir, cfg, info.is_main, task.best_metric, run.model, run.optimizer,
                                run.scheduler, run.scaler, run.loader.sampler, run.state,
                                stateful={"health": run.health}, world_size=info.world_size,
                                steps_per_epoch=len(run.loader), best_mode=task.best_mode)
    begin, start_batch = (cfg.TRAIN.BEGIN_EPOCH, 0) if ckpt is None else manager.restore(ckpt, cfg.SEED, info.rank)
    del ckpt
    # the code and machine as the run starts (the checkout may change while it trains)
    summary = {**task.summary(run.model, cfg), **run_provenance()}
    if info.distributed:
        model = task.prepare_distributed(run.model, info)
        run.model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        manager.model = run.model
    end = cfg.TRAIN.END_EPOCH
    if begin >= end:
        logger.info("the run is finished (the checkpoint is at epoch %d, TRAIN.END_EPOCH is %d): nothing to train; "
                    "evaluating its weights. Raise TRAIN.END_EPOCH to train longer.", begin, end)
    elif forward_kind(run.net) != "equilibrium":
        logger.info("training epochs %d..%d of a model without an equilibrium (%s): no warm-up", begin, end - 1,
                    forward_kind(run.net))
    else:
        logger.info("training epochs %d..%d, warm-up (unrolled) for the first %d steps", begin, end - 1,
                    cfg.TRAIN.PRETRAIN_STEPS)
    val: Dict[str, Any] = {}
    epoch = begin - 1
    try:
        with GracefulStop() as stopper:
            for epoch in range(begin, end):
                val = _run_epoch(run, manager, epoch, start_batch, stopper)
                start_batch = 0
                if run.state.stop:
                    logger.info("TRAIN.MAX_ITERS = %d reached at epoch %d", cfg.TRAIN.MAX_ITERS, epoch)
                    break
    except TrainingDiverged as e:
        raise manager.diverged(e) from e
    finally:
        if run.writer is not None:
            run.writer.close()
    if not val:  # nothing was trained (a finished run): evaluate the weights as they are
        val = _evaluate(run, None)
    return _finish(run, manager, val, epoch + 1, time.time() - start_time, summary)


def _finish(run: Run, manager: CheckpointManager, val: Dict[str, Any], epochs: int, wall: float,
            summary: Dict[str, Any]) -> Dict[str, Any]:
    checksums = all_gather_object(param_checksum(run.model))
    if run.info.distributed:
        same = all(abs(c - checksums[0]) <= 1e-9 * max(1.0, abs(checksums[0])) for c in checksums)
        (logger.info if same else logger.error)("parameter checksums per rank: %s (%s)", checksums,
                                                "identical" if same else "REPLICAS DIFFER")
    best = manager.best if math.isfinite(manager.best) else None
    results = {**run.task.scalars(val), f"best_{run.task.best_metric}": best, "epochs": epochs,
               "global_step": run.state.global_step, "skipped_steps": run.state.skipped_steps, "wall_time_s": wall,
               "world_size": run.info.world_size, "rank_checksums": checksums, **summary}
    manager.save_final(results)
    logger.info("done: %s; best %s %s; %d steps (%d skipped); wall time %.1fs; files in %s",
                run.task.describe(val) if val else "no held-out set", run.task.best_metric,
                "n/a" if best is None else f"{best:.4f}", run.state.global_step, run.state.skipped_steps, wall,
                manager.out_dir)
    return results
