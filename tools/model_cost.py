"""What each model costs, side by side: the MDEQ and its baselines (any MODEL.NAME).

    python tools/model_cost.py --threads 1 --cfg experiments/fashion_mnist/cls_mdeq_fmnist.yaml \
        experiments/fashion_mnist/cls_mdeq_fmnist_unrolled.yaml experiments/fashion_mnist/cls_resnet_fmnist.yaml

Prints a markdown table, one row per config: parameters, MFLOPs per f and per forward pass, the
time and peak memory (RSS) of a training step at the config's batch size, and inference images/s
at ``--infer-batch``; each config in a fresh process. See :mod:`mdeq.analysis.benchmark.model_cost`.

Exit status: 0 done, 2 bad input (a config error, a missing dataset; one-line message), see
:mod:`mdeq.programs.cli`.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from mdeq.analysis.benchmark import CostSpec, dump_json, format_costs, model_costs
from mdeq.programs.cli import tool_main
from mdeq.programs.launch import int_at_least


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", nargs="+", required=True, help="experiment yaml files, one row each")
    p.add_argument("--threads", type=int_at_least(1), default=1, help="torch.set_num_threads in each measurement")
    p.add_argument("--infer-batch", type=int_at_least(1), default=500, help="batch of the inference rate")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed repetitions (the median is reported)")
    p.add_argument("--json", default="", help="also write the rows here")
    p.add_argument("--opts", nargs="*", default=[], metavar="KEY VALUE", help="config overrides for every config")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Measure the configs of the command line ``argv`` (default ``sys.argv[1:]``) and print the table."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    rows = model_costs([CostSpec(cfg=c, opts=list(args.opts), threads=args.threads, infer_batch=args.infer_batch,
                                 repeats=args.repeats) for c in args.cfg])
    print(format_costs(rows))
    if args.json:
        dump_json(rows, args.json)


if __name__ == "__main__":
    tool_main(main)
