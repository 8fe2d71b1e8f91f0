"""Our training step against torchdeq's (a peer implementation) on the same MDEQ f, weights and batch.

    python tools/compare_torchdeq.py --cfg experiments/cifar/cls_mdeq_TINY.yaml \
        --testModel tests/data/reference/cifar_tiny.pkl --batch-size 8 --repeats 2 --threads 1 MODEL.DROPOUT 0.0

Needs torchdeq (``pip install torchdeq==0.1.0``; not in requirements.txt). Prints markdown tables: per
solver a training step (ours, torchdeq, alternated; the evaluations of f and adjoint steps each side
made, counted) and the forward solve alone, and the fixed-point check (the two sides' outputs and
gradients with plain iteration). Every solve runs its whole budget (tolerance 0); torchdeq's budgets
are set so that it makes as many evaluations as ours (``--raw-budgets``: T_f and T_b as given). See
:mod:`mdeq.analysis.peer_comparison`.

Exit status: 0 done, 2 bad input (torchdeq not installed, a config error, a weights or --images file
that is missing or not a checkpoint; one-line message), see :mod:`mdeq.programs.cli`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from mdeq.analysis.benchmark import BenchSpec, dump_json
from mdeq.analysis.peer_comparison import CORES, PEER_SOLVERS, PeerMissing, format_table, import_torchdeq, \
    run_peer_comparison
from mdeq.programs.cli import EXIT_BAD_INPUT, tool_main
from mdeq.programs.launch import add_spec_arguments, int_at_least, names_from
from mdeq.programs.launch import parse_args as parse_launch_args
from mdeq.utils.cpu_allocator import retain_freed_memory


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_arguments(p)
    p.add_argument("--f-thres", type=int_at_least(2), default=None, help="forward threshold (default: MODEL.F_THRES)")
    p.add_argument("--b-thres", type=int_at_least(2), default=None, help="backward threshold (default: MODEL.B_THRES)")
    p.add_argument("--solvers", type=names_from(tuple(PEER_SOLVERS)), default="broyden,anderson",
                   help=f"comma-separated solver names, of {','.join(PEER_SOLVERS)}")
    p.add_argument("--repeats", type=int_at_least(1), default=3,
                   help="timed steps per side, alternated (the median is reported)")
    p.add_argument("--core", choices=CORES, default="sliced", help="torchdeq's DEQ core (one state: the same solve)")
    p.add_argument("--hook-ift", action="store_true",
                   help="torchdeq's hook implicit differentiation (J at z*, one application of f with autograd, "
                        "as ours) instead of its default torch.autograd.Function (which evaluates f again in the "
                        "backward)")
    p.add_argument("--raw-budgets", action="store_true",
                   help="give torchdeq max_iter = T_f / T_b as they are (its Broyden then evaluates f once more "
                        "per solve)")
    p.add_argument("--no-check", action="store_true", help="skip the fixed-point agreement check")
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parse_launch_args(p, argv)  # overrides anywhere, as in the training tools


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the comparison of the command line ``argv`` (default ``sys.argv[1:]``) and print its tables."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    try:
        import_torchdeq()
    except PeerMissing as e:    # an optional dependency: one line, exit status 2, before any work
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    retain_freed_memory()       # as the training programs and the benchmark do
    spec = BenchSpec.from_args(args)
    result = run_peer_comparison(spec, args.f_thres, args.b_thres, args.solvers, args.repeats, core=args.core,
                                 hook_ift=args.hook_ift, match_evals=not args.raw_budgets, check=not args.no_check)
    print(format_table(result))
    if args.json:
        dump_json(result, args.json)


if __name__ == "__main__":
    tool_main(main)
