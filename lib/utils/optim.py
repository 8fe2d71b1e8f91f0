"""Optimisers and learning-rate schedules from a config (TRAIN.* keys), for any task.

Every schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` stepped once per optimiser step
(iteration), whose factor is a closed-form function of the iteration count. Its state is only
that count (``last_epoch``), so restoring ``scheduler.state_dict()`` after a restart gives exactly
the learning rate an uninterrupted run would have, with no accumulated round-off.
"""
from __future__ import annotations

import bisect
import logging
import math
from typing import Any, Callable, Dict, Iterable, List, Sequence, Union

import torch
import torch.nn as nn

from ..config.validation import ConfigError, register_choices

logger = logging.getLogger(__name__)

def _sgd(params: Iterable, cfg) -> torch.optim.Optimizer:
    t = cfg.TRAIN
    if t.NESTEROV and t.MOMENTUM <= 0:
        raise ConfigError(f"TRAIN.NESTEROV is true but TRAIN.MOMENTUM = {t.MOMENTUM}; Nesterov needs momentum > 0")
    return torch.optim.SGD(params, lr=t.LR, momentum=t.MOMENTUM, weight_decay=t.WD, nesterov=bool(t.NESTEROV))


def _adam(params: Iterable, cfg) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=cfg.TRAIN.LR, weight_decay=cfg.TRAIN.WD)


#: ``TRAIN.OPTIMIZER`` names and their builders ``(params, cfg) -> optimizer``: the one list of
#: optimiser names (the config checks ``TRAIN.OPTIMIZER`` against it)
OPTIMIZERS: Dict[str, Callable[[Iterable, Any], torch.optim.Optimizer]] = {"adam": _adam, "sgd": _sgd}
#: ``TRAIN.LR_SCHEDULER`` names (see :func:`build_scheduler`)
SCHEDULERS = ("cosine", "step", "constant")
register_choices("TRAIN.OPTIMIZER", lambda: tuple(OPTIMIZERS))
register_choices("TRAIN.LR_SCHEDULER", lambda: SCHEDULERS)


def build_optimizer(cfg, params: Union[nn.Module, Iterable]) -> torch.optim.Optimizer:
    """``TRAIN.OPTIMIZER`` (``'adam'`` or ``'sgd'``, see :data:`OPTIMIZERS`) with ``TRAIN.LR`` and weight
    decay ``TRAIN.WD``.

    SGD uses ``TRAIN.MOMENTUM`` and ``TRAIN.NESTEROV``. ``params`` is a module (its trainable
    parameters are taken) or an iterable of parameters / parameter groups.

    Raises:
        ConfigError: an unknown optimiser name, or Nesterov without momentum.
    """
    if isinstance(params, nn.Module):
        params = [p for p in params.parameters() if p.requires_grad]
    name = str(cfg.TRAIN.OPTIMIZER).lower()
    if name not in OPTIMIZERS:
        raise ConfigError(f"TRAIN.OPTIMIZER = {cfg.TRAIN.OPTIMIZER!r}; choose one of {tuple(OPTIMIZERS)}")
    return OPTIMIZERS[name](params, cfg)


def cosine_factor(total_steps: int, eta_min_ratio: float = 0.0) -> Callable[[int], float]:
    """Factor of the base LR at iteration ``t``: cosine from 1 to ``eta_min_ratio`` over ``total_steps``."""
    total = max(1, int(total_steps))

    def factor(step: int) -> float:
        t = min(max(step, 0), total)
        return eta_min_ratio + (1.0 - eta_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t / total))

    return factor


def step_factor(milestones: Sequence[int], gamma: float) -> Callable[[int], float]:
    """Factor ``gamma ** (number of milestones <= t)`` (milestones in iterations, sorted)."""
    ms: List[int] = sorted(int(m) for m in milestones)

    def factor(step: int) -> float:
        return gamma ** bisect.bisect_right(ms, step)

    return factor


def total_iterations(cfg, iters_per_epoch: int) -> int:
    """Optimiser steps in the whole run: ``(END_EPOCH - BEGIN_EPOCH) * iters_per_epoch``, capped
    by ``TRAIN.MAX_ITERS`` when that is >= 0."""
    total = max(0, cfg.TRAIN.END_EPOCH - cfg.TRAIN.BEGIN_EPOCH) * int(iters_per_epoch)
    if cfg.TRAIN.MAX_ITERS >= 0:
        total = min(total, cfg.TRAIN.MAX_ITERS)
    return max(1, total)


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, iters_per_epoch: int,
                    eta_min: float = 1e-6) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``TRAIN.LR_SCHEDULER`` schedule, to be stepped after every optimiser step.

    * ``'cosine'``: from ``TRAIN.LR`` down to ``eta_min`` over :func:`total_iterations` steps
      (the original MDEQ's per-iteration cosine annealing).
    * ``'step'``: multiply by ``TRAIN.LR_FACTOR`` at each epoch in ``TRAIN.LR_STEP`` (converted to
      iterations, ``epoch * iters_per_epoch``, counted from ``TRAIN.BEGIN_EPOCH``).
    * ``'constant'``: ``TRAIN.LR`` throughout.

    Raises:
        ValueError: an unknown schedule name, or ``iters_per_epoch < 1``.
    """
    if iters_per_epoch < 1:
        raise ConfigError(f"iters_per_epoch = {iters_per_epoch}: the training set yields no batch "
                         f"(dataset smaller than TRAIN.BATCH_SIZE_PER_GPU with drop_last?)")
    name = str(cfg.TRAIN.LR_SCHEDULER).lower()
    if name == "cosine":
        base = max(cfg.TRAIN.LR, 1e-12)
        fn = cosine_factor(total_iterations(cfg, iters_per_epoch), min(eta_min / base, 1.0))
    elif name == "step":
        milestones = [max(0, e - cfg.TRAIN.BEGIN_EPOCH) * iters_per_epoch for e in cfg.TRAIN.LR_STEP]
        fn = step_factor(milestones, cfg.TRAIN.LR_FACTOR)
    elif name == "constant":
        def fn(step: int) -> float:
            return 1.0
    else:
        raise ConfigError(f"TRAIN.LR_SCHEDULER = {cfg.TRAIN.LR_SCHEDULER!r}; choose one of {SCHEDULERS}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group."""
    return float(optimizer.param_groups[0]["lr"])


def load_scheduler_state(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict) -> None:
    """Restore a schedule from :meth:`state_dict` and set the optimiser's learning rates to the
    schedule's value at the restored step (``LambdaLR.load_state_dict`` alone leaves them as they were)."""
    scheduler.load_state_dict(state)
    step = scheduler.last_epoch
    lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # what get_last_lr() reports
