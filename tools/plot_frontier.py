"""Draw an equilibrium classifier's accuracy/cost frontier from the runs' own result files.

    python tools/plot_frontier.py --exit-sweep output/frontier/sweep/exit_sweep.json \
        --unrolled 2=output/frontier/unrolled2/valid_results.json 4=output/frontier/unrolled4/valid_results.json \
        --costs output/frontier/costs_f4.json --reference cls_resnet_fmnist_wide.yaml=93.52 \
        --out docs/figures/fmnist_frontier.png --json docs/figures/fmnist_frontier.json
    python tools/plot_frontier.py --points docs/figures/fmnist_frontier.json --out docs/figures/fmnist_frontier.png

Prints the markdown table (test top-1, evaluations of f per image, images/s) and writes the picture:
top-1 against mean evaluations of f per image and against images/s. ``--json`` keeps the collected
points; ``--points`` redraws from such a file. See :mod:`mdeq.analysis.frontier` for where each
figure comes from.

Exit status: 0 done, 2 bad input (a missing or malformed result file; one-line message), see
:mod:`mdeq.programs.cli`.
"""
from __future__ import annotations

import argparse
import json
import logging
from typing import Dict, Optional, Sequence

from mdeq.analysis.frontier import FrontierPoint, collect_frontier, format_frontier_table, plot_frontier
from mdeq.config import ConfigError
from mdeq.programs.cli import tool_main


def _pairs(values: Sequence[str], what: str) -> Dict[str, str]:
    out = {}
    for v in values:
        key, sep, val = v.partition("=")
        if not sep or not key or not val:
            raise ConfigError(f"{what} {v!r}: expected KEY=VALUE")
        out[key] = val
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exit-sweep", default="", help="exit_sweep.json of tools/cls_valid.py --exit-sweep")
    p.add_argument("--unrolled", nargs="*", default=[], metavar="DEPTH=FILE",
                   help="valid_results.json of the unrolled stack at each depth")
    p.add_argument("--costs", nargs="*", default=[], metavar="FILE", help="tools/model_cost.py --json files")
    p.add_argument("--reference", nargs="*", default=[], metavar="CFG=TOP1",
                   help="an explicit network's config file name and its top-1 (%%)")
    p.add_argument("--points", default="", help="redraw from the points of an earlier --json instead")
    p.add_argument("--title", default="", help="the picture's title")
    p.add_argument("--out", required=True, help="the PNG to write")
    p.add_argument("--json", default="", help="also write the collected points here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Collect (or read) the points of the command line ``argv`` (default ``sys.argv[1:]``), print the
    table and draw the picture."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.points:
        with open(args.points) as f:
            points = [FrontierPoint(**p) for p in json.load(f)["points"]]
    elif args.exit_sweep:
        unrolled = {int(k): v for k, v in _pairs(args.unrolled, "--unrolled").items()}
        refs = {k: float(v) for k, v in _pairs(args.reference, "--reference").items()}
        points = collect_frontier(args.exit_sweep, unrolled, args.costs, refs)
    else:
        raise ConfigError("give --exit-sweep (with --unrolled, --costs, --reference) or --points")
    print(format_frontier_table(points))
    plot_frontier(points, args.out, args.title)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"points": [p.as_dict() for p in points]}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    tool_main(main)
