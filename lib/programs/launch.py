"""What every training and evaluation program does before its real work: read the command line of
the original MDEQ scripts, build the config it selects, and set the process up (process group,
logging, seeds, cuDNN).

The command line: ``--cfg FILE`` and ``KEY VALUE`` overrides, with the options ``--modelDir``
(OUTPUT_DIR), ``--logDir`` (LOG_DIR), ``--dataDir`` (DATA_DIR, which prefixes a relative
DATASET.ROOT and MODEL.PRETRAINED, as in the original), ``--testModel`` (TEST.MODEL_FILE) and
``--local_rank`` / ``--local-rank`` (set by ``torch.distributed.launch``; ``torchrun`` sets
``LOCAL_RANK`` instead). Options may come before, between or after the ``KEY VALUE`` pairs.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from ..config import ConfigError, load_config
from ..utils.cpu_allocator import retain_freed_memory
from ..utils.distributed import DistInfo, init_distributed
from ..utils.logger import create_logger, output_dirs
from ..utils.rng import seed_everything
from ..utils.run_lock import lock_output_folder

logger = logging.getLogger(__name__)


def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every program shares (see the module docstring); add your own
    and parse with :func:`parse_args`."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--cfg", required=True, help="experiment file (yaml), e.g. experiments/digits/cls_mdeq_digits.yaml")
    p.add_argument("--modelDir", default="", help="output folder (overrides OUTPUT_DIR)")
    p.add_argument("--logDir", default="", help="TensorBoard / log folder (overrides LOG_DIR)")
    p.add_argument("--dataDir", default="", help="DATA_DIR: prefixes a relative DATASET.ROOT and MODEL.PRETRAINED")
    p.add_argument("--testModel", default="", help="checkpoint to evaluate, ours or the original .pkl "
                                                   "(overrides TEST.MODEL_FILE)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=-1,
                   help="set by torch.distributed.launch; torchrun sets LOCAL_RANK instead")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides, e.g. TRAIN.LR 0.01")
    return p


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``low`` (else the usage error names the value)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be >= {low}")
        return value
    parse.__name__ = f"whole number >= {low}"
    return parse


def int_list(text: str) -> List[int]:
    """An argparse ``type``: comma-separated whole numbers >= 0 (``'0,1,2'``), at least one."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if part:
            if not part.isdigit():
                raise argparse.ArgumentTypeError(f"{part!r} in {text!r} is not a whole number >= 0 "
                                                 f"(give a comma-separated list such as 0,1,2)")
            values.append(int(part))
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no number (give a comma-separated list such as 0,1,2)")
    return values


def names_from(choices: Sequence[str]) -> Callable[[str], List[str]]:
    """An argparse ``type``: comma-separated names, each one of ``choices``, at least one."""
    def parse(text: str) -> List[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, unknown)) or repr(text)}: choose from "
                                             f"{', '.join(choices)} (comma-separated)")
        return names
    parse.__name__ = "comma-separated names"
    return parse


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``); ``args.opts`` gets every ``KEY VALUE`` word, wherever
    it stood. An unknown ``--option`` is a usage error (exit status 2)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("--") and a != "--"]   # "-1" is a value
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.opts = [a for a in list(args.opts) + extra if a != "--"]
    return args


def _lacking_value(opts: Sequence[Any]) -> str:
    """Which key of an odd ``KEY VALUE`` list has no value: one followed by another key or by nothing."""
    def is_key(word: Any) -> bool:
        return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.[A-Z0-9_]+)+|[A-Z][A-Z0-9_]+", str(word)))
    missing = [str(w) for i, w in enumerate(opts) if is_key(w) and (i + 1 == len(opts) or is_key(opts[i + 1]))]
    return f"{', '.join(missing)} has no value" if missing else "a key lacks its value"


def config_from_args(args: argparse.Namespace, extra_opts: Sequence[Any] = ()):
    """The frozen config of ``args.cfg`` with the ``KEY VALUE`` overrides of the command line, then
    the directory options (which win over them) and ``extra_opts``."""
    opts: List[Any] = list(args.opts or [])
    if len(opts) % 2:   # checked before the options' own keys are added, which the user did not type
        raise ConfigError(f"command line: overrides come as KEY VALUE pairs; in {' '.join(map(str, opts))!r} "
                          f"{_lacking_value(opts)}")
    for flag, key in (("modelDir", "OUTPUT_DIR"), ("logDir", "LOG_DIR"), ("dataDir", "DATA_DIR"),
                      ("testModel", "TEST.MODEL_FILE")):
        if getattr(args, flag, ""):
            opts += [key, getattr(args, flag)]
    opts += list(extra_opts)
    cfg = load_config(args.cfg, opts)
    if cfg.DATA_DIR:
        prefixed = []
        for key, value in (("DATASET.ROOT", cfg.DATASET.ROOT), ("MODEL.PRETRAINED", cfg.MODEL.PRETRAINED)):
            if value and not os.path.isabs(value):
                prefixed += [key, os.path.join(cfg.DATA_DIR, value)]
        if prefixed:
            cfg = load_config(args.cfg, opts + prefixed)
    return cfg


def setup_process(cfg, cfg_path: str, phase: str, local_rank: int = -1) -> Tuple[DistInfo, str, str]:
    """Join the process group (from the torchrun / torch.distributed.launch environment), for the
    ``"train"`` phase take the output folder's lock (:mod:`mdeq.utils.run_lock`), start logging to
    the run's output folder, seed (SEED + rank), set cuDNN from the config and keep
    freed CPU memory in the process (:func:`mdeq.utils.cpu_allocator.retain_freed_memory`).

    Returns (DistInfo, output folder, TensorBoard folder).

    Raises:
        OutputLockedError: another training run uses the output folder.
    """
    retain_freed_memory()
    info = init_distributed(local_rank)
    if phase == "train":   # one training run per output folder, locked before its log file is written
        lock_output_folder(output_dirs(cfg, cfg_path, phase)[0], info.is_main)
    _, out_dir, tb_dir = create_logger(cfg, cfg_path, phase, info.rank)
    seed_everything(cfg.SEED + info.rank, cfg.DETERMINISTIC)
    if info.device.type == "cuda":
        torch.backends.cudnn.enabled = cfg.CUDNN.ENABLED
        torch.backends.cudnn.benchmark = cfg.CUDNN.BENCHMARK and not cfg.DETERMINISTIC
        torch.backends.cudnn.deterministic = cfg.CUDNN.DETERMINISTIC or cfg.DETERMINISTIC
    logger.info("%s: %s; rank %d/%d on %s; output %s", phase, cfg_path, info.rank, info.world_size,
                info.device, out_dir)
    return info, out_dir, tb_dir


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    """The command-line arguments of a :class:`~mdeq.analysis.benchmark.BenchSpec` (config, weights, images,
    batch, device, threads; the config overrides are the tool's trailing ``opts``), shared by the tools
    that measure one (``BenchSpec.from_args`` reads them back)."""
    from ..analysis.sample_images import IMAGES_HELP     # the measuring tools' layer, not the training tools'
    p.add_argument("--cfg", required=True, help="experiment yaml")
    p.add_argument("--batch-size", type=int_at_least(1), default=32)
    p.add_argument("--image-size", type=int_at_least(1), default=32)
    p.add_argument("--testModel", default="", help="weights to load (ours or the original .pkl); default random init")
    p.add_argument("--images", default="", help=IMAGES_HELP)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int_at_least(0), default=0, help="torch.set_num_threads (0: torch's default)")
