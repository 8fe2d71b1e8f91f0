"""Logging set-up and output folders for training / evaluation scripts.

Layout (as the original MDEQ): ``OUTPUT_DIR/<dataset>/<cfg file stem>/`` holds checkpoints and the
log file ``<stem>_<phase>_<time>.log``; TensorBoard events go to
``LOG_DIR/<dataset>/<stem>_<phase>_<time>/``. Only rank 0 creates folders and writes the log file;
other ranks log warnings and errors to the console only.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Tuple

from tqdm import tqdm

from .output_files import check_writable, describe, find_os_error

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LogFileHandler(logging.FileHandler):
    """The run's log file. A record it cannot write (full disk, I/O error) is reported once on stderr
    and the file is given up: the run goes on, logging to the console, rather than printing
    logging's traceback for every later record."""

    def __init__(self, filename: str | os.PathLike) -> None:
        super().__init__(filename)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        cause = find_os_error(sys.exc_info()[1]) if sys.exc_info()[1] is not None else None
        if cause is None:
            return super().handleError(record)
        self.failed = True
        sys.stderr.write(f"warning: cannot write the log file {self.baseFilename}: {describe(cause)}; the run "
                         f"goes on and logs to the console only\n")
        stream, self.stream = self.stream, None
        try:
            stream.close()
        except OSError:
            pass


def output_dirs(cfg, cfg_path: Optional[str], phase: str, timestamp: Optional[str] = None) -> Tuple[Path, Path, str]:
    """(final output folder, TensorBoard folder, run name) for ``cfg`` loaded from ``cfg_path``."""
    stem = Path(cfg_path).stem if cfg_path else "default"
    dataset = str(cfg.DATASET.DATASET or "dataset").replace("/", "_")
    stamp = timestamp or time.strftime("%Y-%m-%d-%H-%M-%S")
    out_dir = Path(cfg.OUTPUT_DIR) / dataset / stem
    tb_dir = Path(cfg.LOG_DIR) / dataset / f"{stem}_{phase}_{stamp}"
    return out_dir, tb_dir, f"{stem}_{phase}_{stamp}"


def create_logger(cfg, cfg_path: Optional[str], phase: str = "train", rank: Optional[int] = None,
                  level: int = logging.INFO) -> Tuple[logging.Logger, str, str]:
    """Configure the root logger and create the output folders.

    Args:
        cfg: the config (reads OUTPUT_DIR, LOG_DIR, DATASET.DATASET).
        cfg_path: the experiment file; its stem names the output folder.
        phase: e.g. ``'train'``, ``'valid'``, ``'test'``; part of the log-file and TensorBoard names.
        rank: this process's rank; default from the ``RANK`` environment variable (0 if unset).
        level: the console / file level on rank 0 (other ranks use WARNING).

    Returns:
        ``(logger, final_output_dir, tb_log_dir)``; the folders exist on rank 0.

    Raises:
        OutputDirError: a folder cannot be created or written (checked before any file is written).
    """
    if rank is None:
        rank = int(os.environ.get("RANK", "0") or 0)
    out_dir, tb_dir, run_name = output_dirs(cfg, cfg_path, phase)
    handlers: list = [logging.StreamHandler(sys.stdout)]
    if rank == 0:
        check_writable(out_dir, "output folder")  # before anything is written
        check_writable(tb_dir, "TensorBoard folder")
        handlers.append(LogFileHandler(out_dir / f"{run_name}.log"))
    fmt = LOG_FORMAT if rank == 0 else f"[rank {rank}] " + LOG_FORMAT
    logging.basicConfig(level=level if rank == 0 else logging.WARNING, format=fmt, handlers=handlers, force=True)
    log = logging.getLogger()
    if rank == 0:
        log.info("output folder %s, TensorBoard folder %s", out_dir, tb_dir)
    return log, str(out_dir), str(tb_dir)


def progress_bar(iterable: Iterable, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar shown only when ``enabled`` and stderr is a terminal: in a log file (``> log``,
    SLURM, nohup) a bar's every refresh would be a line of its own, and the log lines every
    PRINT_FREQ steps and the epoch summaries already say what it would."""
    show = enabled and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
    return tqdm(iterable, disable=not show, leave=False, dynamic_ncols=True, **kwargs)
