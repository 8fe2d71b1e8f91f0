"""``--f-thres-sweep``: what fewer forward solver steps cost, for ``tools/cls_valid.py`` and
``tools/seg_test.py``. Each checkpoint of ``--testModel a.pth,b.pth`` is evaluated at every budget;
the table goes to the log, the plot and the rows to ``OUTPUT_DIR/.../f_thres_sweep.{png,json}``
(:mod:`mdeq.analysis.sweep`)."""
from __future__ import annotations

import argparse
from typing import Any, Callable, Dict, Mapping

from ..analysis.sweep import parse_budgets, sweep_models
from ..core.checkpoint_manager import model_files


def add_sweep_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--f-thres-sweep", dest="f_thres_sweep", default="",
                        help="evaluate at each of these forward budgets, e.g. 2,4,8,16,32 (table in the log, PNG "
                             "plot and JSON in the output folder); --testModel may then list several "
                             "checkpoints, comma-separated, one curve each")


def sweep_checkpoints(cfg, out_dir: str, budgets: str, load: Callable[[str], Any], metric_key: str,
                      metric_name: str, evaluate: Callable[[int], Mapping[str, float]], write: bool
                      ) -> Dict[str, Any]:
    """Load each checkpoint of TEST.MODEL_FILE (comma-separated; default the run's final weights) and
    ``evaluate(f_thres)`` at every budget; returns the rows per checkpoint.

    Raises:
        FileNotFoundError: a checkpoint does not exist.
    """
    thresholds = parse_budgets(budgets)
    files = model_files(cfg, out_dir, several=True)
    rows = sweep_models(files, load, evaluate, thresholds, out_dir, metric_key, metric_name, write=write)
    return {p: [r.as_dict() for r in rs] for p, rs in rows.items()}
