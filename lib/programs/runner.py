"""The one runner of every task's programs: ``train`` (``tools/cls_train.py``, ``tools/seg_train.py``)
and ``test`` (``tools/cls_valid.py``, ``tools/seg_test.py``).

Both read the command line of the original scripts (:mod:`mdeq.programs.launch`, plus the task's
own options), build the config, set the process up, and run inside
:func:`~mdeq.utils.distributed.process_group_closed`: ``train`` the engine's
:func:`~mdeq.core.trainer.fit` on the task; ``test`` the task's evaluation of one checkpoint or,
with ``--f-thres-sweep``, every checkpoint of ``--testModel`` at every forward budget
(:mod:`mdeq.programs.sweep`). A :class:`TaskProgram` says what a task's programs add.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import torch.nn as nn
from torch.utils.data import DataLoader

from ..config import ConfigError
from ..core.trainer import STOPPED_TOGETHER, Task, fit
from ..models import forward_kind
from ..models.inference import evaluation_model
from ..utils.checkpoint import load_weights
from ..utils.distributed import DistInfo, process_group_closed
from .launch import base_parser, config_from_args, setup_process
from .launch import parse_args as parse_launch_args
from .sweep import add_sweep_option, sweep_checkpoints

logger = logging.getLogger(__name__)


class TaskProgram:
    """What one task's ``train`` and ``test`` programs add to the runner; subclasses override it."""

    #: the task the programs train and evaluate
    task_class: Type[Task] = Task
    #: the command lines' descriptions: (``train``, ``test``)
    descriptions: Tuple[str, str] = ("Train an MDEQ", "Evaluate an MDEQ")
    #: the output folder's phase of ``test`` (its log file's name)
    test_phase = "test"
    #: (key of :meth:`evaluate_at`'s result, its name in the table and plot) of ``--f-thres-sweep``
    sweep_metric: Tuple[str, str] = ("score", "score")

    def add_options(self, parser: argparse.ArgumentParser, test: bool) -> None:
        """The task's own options (``test``: for the evaluation program)."""

    def config_opts(self, args: argparse.Namespace) -> List[Any]:
        """``KEY VALUE`` overrides that the task's options imply."""
        return []

    def check_config(self, cfg) -> None:
        """Refuse a config the task cannot run, before the process is set up (raise a ConfigError)."""

    def load(self, model: nn.Module, path: str) -> None:
        """Load the weights of checkpoint ``path`` into ``model``."""
        load_weights(model, path)

    def test_loader(self, cfg, info: DistInfo) -> DataLoader:
        """The loader of the set ``test`` evaluates (each rank its shard)."""
        raise NotImplementedError

    def evaluate_at(self, model: nn.Module, loader: DataLoader, cfg, info: DistInfo, f_thres: int
                    ) -> Dict[str, float]:
        """One row of ``--f-thres-sweep``: the metric of :attr:`sweep_metric`, ``f_steps``, ``f_rel``."""
        raise NotImplementedError

    def test(self, args: argparse.Namespace, cfg, info: DistInfo, out_dir: str) -> Dict[str, Any]:
        """Evaluate the one checkpoint of the command line (its results logged and written)."""
        raise NotImplementedError


def parse_args(program: TaskProgram, argv: Optional[Sequence[str]], test: bool) -> argparse.Namespace:
    """The shared options (:func:`~mdeq.programs.launch.base_parser`), the task's own and, for
    ``test``, ``--f-thres-sweep``."""
    parser = base_parser(program.descriptions[int(test)])
    program.add_options(parser, test)
    if test:
        add_sweep_option(parser)
    return parse_launch_args(parser, argv)


def _setup(program: TaskProgram, args: argparse.Namespace, phase: str) -> Tuple[Any, DistInfo, str, str]:
    cfg = config_from_args(args, program.config_opts(args))
    program.check_config(cfg)
    info, out_dir, tb_dir = setup_process(cfg, args.cfg, phase, args.local_rank)
    logger.info("overrides: %s", " ".join(map(str, args.opts)) or "none")
    return cfg, info, out_dir, tb_dir


def run_train(program: TaskProgram, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Train the task from the command line ``argv`` (default ``sys.argv[1:]``); returns the final
    results (as in ``results.json``)."""
    cfg, info, out_dir, tb_dir = _setup(program, parse_args(program, argv, test=False), "train")
    with process_group_closed(together=STOPPED_TOGETHER):
        return fit(program.task_class(), cfg, info, out_dir, tb_dir)


def run_test(program: TaskProgram, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Evaluate a checkpoint from the command line ``argv``; with ``--f-thres-sweep``, every checkpoint
    at every budget (returns the rows per checkpoint)."""
    args = parse_args(program, argv, test=True)
    if args.f_thres_sweep and getattr(args, "exit_sweep", ""):
        raise ConfigError("give --f-thres-sweep or --exit-sweep, not both (--exit-sweep takes budgets too: none@4)")
    cfg, info, out_dir, _ = _setup(program, args, program.test_phase)
    with process_group_closed():
        if not args.f_thres_sweep:
            return program.test(args, cfg, info, out_dir)
        model = program.task_class().build_model(cfg, initial_weights=False).to(info.device)
        if forward_kind(model) != "equilibrium":
            raise ConfigError(f"--f-thres-sweep varies the forward solver's budget: MODEL.NAME {cfg.MODEL.NAME!r} "
                              f"has no equilibrium ({forward_kind(model)} network)")
        loader = program.test_loader(cfg, info)
        key, name = program.sweep_metric
        evaluated = [model]     # what each checkpoint's budgets run: its evaluation copy (TEST.FOLD_BN ...)

        def load(path: str) -> None:
            program.load(model, path)
            evaluated[0] = evaluation_model(model, cfg)

        return sweep_checkpoints(cfg, out_dir, args.f_thres_sweep, load, key, name,
                                 lambda t: program.evaluate_at(evaluated[0], loader, cfg, info, t), info.is_main)
