"""Plot the forward solvers' convergence: relative residual against f evaluations.

    python tools/plot_convergence.py --cfg experiments/cifar/cls_mdeq_TINY.yaml \
        --testModel tests/data/reference/cifar_tiny.pkl --out-dir output/convergence MODEL.DROPOUT 0.0

Writes ``convergence_solvers.png`` (the paper's Figure 6: Broyden, Anderson and plain iteration),
``convergence_streams.png`` (Figure 7: the residual of each resolution stream's part of z, one
panel per solver) and ``convergence.json`` (the traces). Random initialisation without --testModel;
crops of real photographs without --images.

Exit status: 0 done, 2 bad input (a config error, a weights or --images file that is missing or not
a checkpoint; one-line message), see :mod:`mdeq.programs.cli`.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mdeq.config import ConfigError, load_config  # noqa: E402
from mdeq.programs.cli import tool_main  # noqa: E402
from mdeq.solvers import solver_names  # noqa: E402
from mdeq.programs.launch import int_at_least, names_from  # noqa: E402
from mdeq.programs.launch import parse_args as parse_launch_args  # noqa: E402
from mdeq.models import forward_kind, get_cls_net  # noqa: E402
from mdeq.utils.checkpoint import load_weights  # noqa: E402
from mdeq.analysis.convergence import convergence_traces  # noqa: E402
from mdeq.analysis.sample_images import IMAGES_HELP, tool_batch  # noqa: E402

LABELS = {"broyden": "L-Broyden", "anderson": "Anderson", "fixed_point": "plain iteration"}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cfg", required=True)
    p.add_argument("--testModel", default="", help="weights (ours or the original .pkl); default random init")
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--image-size", type=int_at_least(0), default=0, help="default: MODEL.IMAGE_SIZE[0]")
    p.add_argument("--evals", type=int_at_least(1), default=30, help="f evaluations per solver")
    p.add_argument("--solvers", type=names_from(solver_names()), default=",".join(solver_names()),
                   help=f"comma-separated solver names, of {','.join(solver_names())}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", default="", help=IMAGES_HELP)
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--out-dir", default="output/convergence")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="config overrides")
    return parse_launch_args(p, argv)  # overrides anywhere, as in the training tools


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Record the traces of the command line ``argv`` (default ``sys.argv[1:]``) and plot them."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.cfg, list(args.opts))
    torch.manual_seed(args.seed)
    model = get_cls_net(cfg)
    if forward_kind(model) == "explicit":
        raise ConfigError(f"MODEL.NAME {cfg.MODEL.NAME!r} is an explicit network: it has no f whose solves to trace")
    if args.testModel:
        load_weights(model, args.testModel)
    model.to(args.device)
    size = args.image_size or int(cfg.MODEL.IMAGE_SIZE[0])
    x = tool_batch(args.images, args.batch_size, size, cfg, args.seed).to(args.device)
    size = x.shape[-1]
    traces = convergence_traces(model, x, args.solvers, args.evals)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = Path(args.testModel).name if args.testModel else "random init"
    title = f"{Path(args.cfg).stem} ({weights}), batch {args.batch_size}, {size}x{size}"

    fig, ax = plt.subplots(figsize=(6, 4.2))
    for name, t in traces.items():
        ax.semilogy(range(1, len(t["total"]) + 1), t["total"], marker=".", label=LABELS.get(name, name))
    ax.set_xlabel("f evaluations")
    ax.set_ylabel("relative residual ||f(z) - z|| / ||f(z)||")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "convergence_solvers.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(traces), figsize=(4.2 * len(traces), 3.8), sharey=True, squeeze=False)
    for ax, (name, t) in zip(axes[0], traces.items()):
        per_stream = list(zip(*t["streams"]))
        for i, (trace, shape) in enumerate(zip(per_stream, t["shapes"])):
            ax.semilogy(range(1, len(trace) + 1), trace, label=f"stream {i + 1} ({shape[1]}x{shape[2]}, {shape[0]} ch)")
        ax.set_title(LABELS.get(name, name))
        ax.set_xlabel("f evaluations")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("relative residual of the stream")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "convergence_streams.png", dpi=120)
    plt.close(fig)
    (out / "convergence.json").write_text(json.dumps(traces))
    for name, t in traces.items():
        logging.info("%s: relative residual %.3g after %d evaluations", name, t["total"][-1], len(t["total"]))
    logging.info("wrote %s", ", ".join(str(out / n) for n in ("convergence_solvers.png", "convergence_streams.png")))


if __name__ == "__main__":
    tool_main(main)
