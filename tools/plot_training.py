"""Draw the course of one or more training runs from their ``history.jsonl``: held-out top-1, loss, the
forward solver's relative residual at its budget and its steps (training and held-out), the backward
residual and the training time of each epoch (see :mod:`mdeq.analysis.training_curves`).

    python tools/plot_training.py output/fashion_mnist/cls_mdeq_fmnist --out docs/fmnist_training.png
    python tools/plot_training.py RUN_A RUN_B --labels implicit,JR --out curves.png

Each RUN is a run's output folder (the one ``history.jsonl`` below it is read) or the file itself.
Exit status: 0 done, 2 bad input (a run without its history, an unreadable line, labels that do not
match the runs; one-line message), see :mod:`mdeq.programs.cli`.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from mdeq.analysis.training_curves import find_history, plot_histories, read_history
from mdeq.config import ConfigError
from mdeq.programs.cli import tool_main


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run output folders or history.jsonl files")
    p.add_argument("--labels", default="", help="comma-separated legend labels, one per run (default: folder names)")
    p.add_argument("--title", default="", help="the figure's title")
    p.add_argument("--out", default="output/training.png", help="the PNG to write")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Draw the runs of the command line ``argv`` (default ``sys.argv[1:]``) into one PNG."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    paths = [find_history(Path(r)) for r in args.runs]
    labels = [s for s in args.labels.split(",")] if args.labels else [Path(r).resolve().name for r in args.runs]
    if len(labels) != len(paths):
        raise ConfigError(f"--labels has {len(labels)} labels for {len(paths)} runs")
    histories = []
    for path in paths:
        try:
            histories.append(read_history(path))
        except ValueError as e:
            raise ConfigError(str(e)) from e
    out = plot_histories(list(zip(labels, histories)), Path(args.out), args.title or None)
    logging.info("wrote %s (%s)", out, ", ".join(f"{lab}: {len(h)} epochs" for lab, h in zip(labels, histories)))


if __name__ == "__main__":
    tool_main(main)
