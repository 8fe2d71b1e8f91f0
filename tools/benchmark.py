"""Benchmark the equilibrium solvers against the physical limit (one f evaluation) on CPU or CUDA.

    python tools/benchmark.py --cfg experiments/cifar/cls_mdeq_TINY.yaml \
        --testModel tests/data/reference/cifar_tiny.pkl --batch-size 32 --image-size 32 MODEL.DROPOUT 0.0

Prints markdown tables: f / VJP / stem+head times, forward solves of each solver at an equal number
of f evaluations, training steps with their solver overhead, the unrolled warm-up at the same depth,
and the peak memory of a training step at two thresholds. ``--parts reversible`` measures the reversible
backward instead (gradient drift against stored autograd, peak memory; docs/reversible.md). See
:mod:`mdeq.analysis.benchmark`.

Exit status: 0 done, 2 bad input (a config error, a weights or --images file that is missing or not
a checkpoint; one-line message), see :mod:`mdeq.programs.cli`.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from mdeq.analysis.benchmark import DEFAULT_PARTS, PARTS, BenchSpec, dump_json, format_report, run_benchmark
from mdeq.solvers import solver_names
from mdeq.programs.cli import tool_main
from mdeq.programs.launch import add_spec_arguments, int_at_least, names_from
from mdeq.programs.launch import parse_args as parse_launch_args
from mdeq.utils.cpu_allocator import retain_freed_memory


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_spec_arguments(p)
    p.add_argument("--f-thres", type=int_at_least(1), default=None, help="forward threshold (default: MODEL.F_THRES)")
    p.add_argument("--b-thres", type=int_at_least(1), default=None, help="backward threshold (default: MODEL.B_THRES)")
    p.add_argument("--solvers", type=names_from(solver_names()), default=",".join(solver_names()),
                   help=f"comma-separated solver names, of {','.join(solver_names())}")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed repetitions (the median is reported)")
    p.add_argument("--mem-thres", default="10,40", help="thresholds for the peak-memory table")
    p.add_argument("--parts", default=",".join(DEFAULT_PARTS),
                   help=f"comma-separated parts to run, of {','.join(PARTS)} (default all but reversible; the component "
                        "timings also run for train and unrolled, whose figures divide by them)")
    p.add_argument("--json", default="", help="also write the raw results here")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parse_launch_args(p, argv)  # overrides anywhere, as in the training tools


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the benchmark of the command line ``argv`` (default ``sys.argv[1:]``) and print its tables."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    retain_freed_memory()       # as the training programs do (the memory rows run in fresh processes)
    spec = BenchSpec.from_args(args)
    result = run_benchmark(spec, args.f_thres, args.b_thres, args.solvers,
                           args.repeats, [int(t) for t in args.mem_thres.split(",") if t],
                           parts=[p for p in args.parts.split(",") if p])
    print(format_report(result))
    if args.json:
        dump_json(result, args.json)


if __name__ == "__main__":
    tool_main(main)
