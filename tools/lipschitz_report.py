"""Print what a trained Lipschitz MDEQ's contraction buys, on its held-out set (see
:mod:`mdeq.analysis.lipschitz_report`):

    python tools/lipschitz_report.py --cfg experiments/digits/cls_mdeq_digits_lipschitz.yaml \\
        --testModel output/digits/cls_mdeq_digits_lipschitz/final_state.pth

The certified bound, each convolution's certified norm against its power estimate and cap, the empirical
||J_f(z*)|| over the held-out images, and the forward and adjoint plain-iteration steps to 1e-3 and 1e-5
against the a-priori counts. ``KEY VALUE`` pairs override config keys.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from mdeq.analysis.lipschitz_report import lipschitz_report, report_table
from mdeq.datasets import build_cls_val_dataset
from mdeq.models import get_cls_net
from mdeq.programs.cli import tool_main
from mdeq.programs.launch import config_from_args, int_at_least
from mdeq.utils.checkpoint import load_weights


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True, help="the Lipschitz MDEQ's experiment file")
    p.add_argument("--testModel", required=True, help="its trained weights")
    p.add_argument("--images", type=int_at_least(1), default=300, help="held-out images to measure on (default 300)")
    p.add_argument("opts", nargs="*", help="KEY VALUE config overrides")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Measure the model of the command line ``argv`` (default ``sys.argv[1:]``) and print the table."""
    args = parse_args(argv)
    cfg = config_from_args(args)
    model = get_cls_net(cfg)
    load_weights(model, args.testModel)
    data = build_cls_val_dataset(cfg)
    n = min(args.images, len(data))
    images = torch.stack([data[i][0] for i in range(n)])
    labels = torch.tensor([int(data[i][1]) for i in range(n)])
    print(report_table(lipschitz_report(model, images, labels)))


if __name__ == "__main__":
    tool_main(main)
