"""Draw the multiscale f_theta of this code (``lib/models/mdeq_core.py``) for three resolutions:
the stem and its input injection at the highest resolution, the residual blocks of each
resolution, the multiscale fusion, and the equilibrium z* = f_theta(z*; x).

    python docs/figures/draw_mdeq_f.py --out docs/figures/mdeq_f.png
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch  # noqa: E402

#: per resolution: its name, the row's y, the state box's height (coarser states are drawn smaller)
STREAMS: Tuple[Tuple[str, float, float], ...] = (("H x W", 7.2, 1.5), ("H/2 x W/2", 4.4, 1.05), ("H/4 x W/4", 2.0, 0.7))
COLOURS = ("#4C72B0", "#55A868", "#C44E52")
X_STATE, X_BLOCK, X_FUSE, X_OUT = 2.9, 5.3, 8.7, 11.9


def box(ax, x: float, y: float, w: float, h: float, text: str, colour: str, alpha: float = 0.18,
        size: float = 9) -> None:
    """A rounded box centred on (x, y) with ``text`` inside."""
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05,rounding_size=0.12",
                                facecolor=colour, alpha=alpha, edgecolor=colour, linewidth=1.5))
    ax.text(x, y, text, ha="center", va="center", fontsize=size)


def arrow(ax, start: Tuple[float, float], end: Tuple[float, float], colour: str = "black",
          style: str = "-|>", rad: float = 0.0, lw: float = 1.3, ls: str = "-") -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=lw,
                                 linestyle=ls, connectionstyle=f"arc3,rad={rad}"))


def draw_streams(ax) -> None:
    """The states z_i, their residual blocks and the outputs f(z)_i, one row per resolution."""
    for i, ((name, y, h), colour) in enumerate(zip(STREAMS, COLOURS)):
        box(ax, X_STATE, y, 1.1, h, f"$z_{i + 1}$\n{name}", colour)
        block = "residual block(s)\nconv3x3-GN-ReLU\nconv3x3" + (" + inj." if i == 0 else "") + "-GN\n+ skip, ReLU, GN"
        box(ax, X_BLOCK, y, 2.2, max(h, 1.25), block, colour, size=8)
        arrow(ax, (X_STATE + 0.6, y), (X_BLOCK - 1.15, y), colour)
        box(ax, X_OUT, y, 1.3, h, f"$f_\\theta(z)_{i + 1}$", colour)
        ax.add_patch(Circle((X_FUSE + 0.85, y), 0.2, facecolor="white", edgecolor=colour, linewidth=1.3, zorder=3))
        ax.text(X_FUSE + 0.85, y, "+", ha="center", va="center", fontsize=10, color=colour, zorder=4)
        arrow(ax, (X_FUSE + 1.05, y), (X_OUT - 0.7, y), colour)
        ax.text((X_FUSE + 1.05 + X_OUT - 0.7) / 2 + 0.1, y + 0.18, "ReLU, conv1x1, GN", fontsize=7, ha="center",
                color=colour)


def draw_fusion(ax) -> None:
    """Every stream adds every other: strided convs downwards, conv1x1 + nearest upsampling upwards."""
    ax.add_patch(FancyBboxPatch((X_FUSE - 1.4, 1.1), 2.5, 7.0, boxstyle="round,pad=0.05,rounding_size=0.2",
                                facecolor="#EEEEEE", edgecolor="grey", linewidth=1.0, linestyle="--"))
    ax.text(X_FUSE - 0.15, 8.35, "multiscale fusion (sum)", ha="center", fontsize=9, weight="bold")
    for i, (_, y_from, _) in enumerate(STREAMS):
        arrow(ax, (X_BLOCK + 1.1, y_from), (X_FUSE + 0.65, y_from), COLOURS[i])
        for j, (_, y_to, _) in enumerate(STREAMS):
            if i == j:
                continue
            down = j > i
            x0 = X_FUSE - 1.1 + 0.35 * (i + j) if down else X_FUSE + 0.7 - 0.3 * (i + j)
            arrow(ax, (x0, y_from - 0.25 if down else y_from + 0.25), (x0, y_to + 0.25 if down else y_to - 0.25),
                  COLOURS[i], lw=1.0, ls="-" if down else "--")
    ax.text(X_FUSE - 0.15, 0.7, "solid: stride-2 conv3x3 + GN (down)\ndashed: conv1x1 + GN, nearest upsampling (up)",
            ha="center", va="center", fontsize=7.5)


def draw_stem_and_loop(ax) -> None:
    """The input, its stem and injection into the highest resolution; the fixed-point loop."""
    y_top = STREAMS[0][1]
    box(ax, 0.6, 9.4, 1.1, 0.7, "image x", "grey")
    box(ax, 3.1, 9.4, 2.7, 0.75, "stem: conv3x3-BN-ReLU x 2\n(stride 2 per DOWNSAMPLE_TIMES)", "grey", size=7.5)
    arrow(ax, (1.15, 9.4), (1.7, 9.4))
    arrow(ax, (4.45, 9.3), (X_BLOCK - 0.2, y_top + 0.65), "black")
    ax.text(5.0, 8.95, "input injection $\\tilde{x}$\n(highest resolution only)", fontsize=7.5, ha="left")
    arrow(ax, (X_OUT, 1.55), (X_STATE, 1.2), "black", rad=-0.22, lw=1.6)
    ax.text((X_OUT + X_STATE) / 2, -0.45, "solved for the equilibrium $z^* = f_\\theta(z^*; x)$ "
            "(L-Broyden; gradient by the implicit function theorem)", ha="center", fontsize=8.5)
    ax.text(12.6, 9.4, "$z^*$ → classification /\nsegmentation head", fontsize=8, ha="center", va="center")
    arrow(ax, (X_OUT, 8.05), (12.4, 8.95), "black")


def draw(out: Path) -> Path:
    """Draw the figure into ``out`` (PNG)."""
    fig, ax = plt.subplots(figsize=(11, 7.2))
    ax.set_xlim(-0.2, 13.6)
    ax.set_ylim(-1.0, 10.1)
    ax.axis("off")
    draw_streams(ax)
    draw_fusion(ax)
    draw_stem_and_loop(ax)
    ax.set_title("$f_\\theta(z; x)$ of a 3-resolution MDEQ (lib/models/mdeq_core.py, MDEQModule)", fontsize=11)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(Path(__file__).with_name("mdeq_f.png")), help="the PNG to write")
    draw(Path(p.parse_args(argv).out))


if __name__ == "__main__":
    main()
