"""Train a benchmark's config with each backward mode / regulariser for several seeds and print the
comparison tables of docs/training.md ("Training cost") and docs/fashion_mnist.md (see
:mod:`mdeq.analysis.cost_comparison`).

    python tools/compare_training_cost.py --seeds 0,1,2 --out output/training_cost
    python tools/compare_training_cost.py --benchmark fashion_mnist --seeds 0,1 --out output/training_cost_fmnist
    python tools/compare_training_cost.py --benchmark fashion_mnist_reversible --seeds 0,1 --out output/training_cost_rev
    python tools/compare_training_cost.py --report output/training_cost/runs.jsonl   # table only
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from mdeq.analysis.cost_comparison import BENCHMARKS, format_table, read_runs, run_comparison
from mdeq.programs.cli import tool_main
from mdeq.programs.launch import int_list

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=sorted(BENCHMARKS), default="digits",
                   help="the variants to train (default: digits)")
    p.add_argument("--seeds", type=int_list, default="0,1,2", help="comma-separated seeds")
    p.add_argument("--out", default=str(REPO / "output" / "training_cost"), help="runs and runs.jsonl go here")
    p.add_argument("--only", default="", help="comma-separated variant names to run (default: all)")
    p.add_argument("--report", default="", help="print the table of an existing runs.jsonl and exit")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Train the variants of the command line ``argv`` (or read ``--report``) and print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    make_variants, baseline = BENCHMARKS[args.benchmark]
    if args.report:
        print(format_table(read_runs(Path(args.report)), baseline))
        return
    variants = make_variants(REPO)
    if args.only:
        keep = set(args.only.split(","))
        variants = [v for v in variants if v.name in keep]
    rows = run_comparison(variants, args.seeds, Path(args.out), REPO)
    print(format_table(rows, baseline))


if __name__ == "__main__":
    tool_main(main)
