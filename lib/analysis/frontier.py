"""The accuracy/cost frontier of an equilibrium classifier: held-out top-1 against the evaluations of f
per image and against images/s, for its evaluation settings, the same weights unrolled, and explicit
networks beside it (``tools/plot_frontier.py``, docs/performance.md).

Everything is read from the runs' own outputs, so a figure of the docs is never typed by hand:

* ``exit_sweep.json`` of ``tools/cls_valid.py --exit-sweep`` (the equilibrium's settings: fixed budgets
  ``none@k`` and per-sample stopping rules), its ``top1`` and evaluations of f per image;
* ``valid_results.json`` of ``tools/cls_valid.py ... MODEL.NAME mdeq_unrolled MODEL.NUM_LAYERS d``
  (the same weights as a weight-tied stack of depth d);
* the rows of ``tools/model_cost.py --json`` for images/s, matched by what a row computes: an
  equilibrium row at tolerance 0 runs exactly ``f_evals`` evaluations (setting ``none@f_evals``), an
  unrolled row is depth ``f_evals``, an explicit row is matched by its config's file name. A setting
  with no such row (a per-sample rule) has no images/s of its own.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from ..config import ConfigError
from ..utils.output_files import replace_file

#: the kinds of points, in the order of the table
FORWARDS = ("equilibrium", "unrolled", "explicit")


@dataclass
class FrontierPoint:
    """One way to evaluate: its top-1 (%), evaluations of f per image (mean, 90th percentile; 0 for an
    explicit network) and inference images/s (None where not measured)."""

    forward: str
    setting: str
    top1: float
    f_evals_mean: float
    f_evals_p90: float
    images_per_s: Optional[float] = None

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def _read(path: str | Path, key: str = "") -> Any:
    """The JSON of ``path`` (its entry ``key`` if given); a malformed file is a ConfigError naming it."""
    try:
        with open(path) as f:
            data = json.load(f)
        return data[key] if key else data
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not the result file expected here ({type(e).__name__}: {e})") from None


def _rate(costs: Sequence[Mapping[str, Any]], forward: str, f_evals: Optional[int] = None,
          cfg_name: str = "") -> Optional[float]:
    for row in costs:
        if row.get("forward") != forward:
            continue
        if (cfg_name and Path(row["cfg"]).name == cfg_name) or (not cfg_name and row.get("f_evals") == f_evals):
            return float(row["images_per_s"])
    return None


def collect_frontier(exit_sweep: str | Path, unrolled: Mapping[int, str | Path], costs: Sequence[str | Path],
                     references: Mapping[str, float]) -> List[FrontierPoint]:
    """The points of the frontier from the runs' files (see the module docstring).

    Args:
        exit_sweep: an ``exit_sweep.json``.
        unrolled: depth -> ``valid_results.json`` of the unrolled stack at that depth.
        costs: ``tools/model_cost.py --json`` files (their rows are pooled).
        references: config file name of an explicit network -> its top-1 (%), measured elsewhere
            (its checkpoint's evaluation); its images/s comes from the cost rows.
    """
    cost_rows: List[Mapping[str, Any]] = [r for path in costs for r in _read(path)]
    points = []
    for row in _read(exit_sweep, "rows"):
        budget = row["setting"].split("@")[1] if row["setting"].startswith("none@") else None
        rate = _rate(cost_rows, "equilibrium", f_evals=int(budget)) if budget else None
        points.append(FrontierPoint("equilibrium", row["setting"], float(row["top1"]), float(row["f_evals_mean"]),
                                    float(row["f_evals_p90"]), rate))
    for depth, path in sorted(unrolled.items()):
        points.append(FrontierPoint("unrolled", f"depth {depth}", float(_read(path, "top1")), float(depth), float(depth),
                                    _rate(cost_rows, "unrolled", f_evals=int(depth))))
    for name, top1 in references.items():
        points.append(FrontierPoint("explicit", Path(name).stem, float(top1), 0.0, 0.0,
                                    _rate(cost_rows, "explicit", cfg_name=Path(name).name)))
    return points


def format_frontier_table(points: Sequence[FrontierPoint]) -> str:
    """A markdown table, one line per point, grouped by forward."""
    lines = ["| forward | setting | test top-1 (%) | mean f evals / image | p90 f evals / image | images/s |",
             "|---|---|---:|---:|---:|---:|"]
    for kind in FORWARDS:
        for i, p in enumerate(q for q in points if q.forward == kind):
            rate = "-" if p.images_per_s is None else f"{p.images_per_s:.0f}"
            evals = ("-", "-") if kind == "explicit" else (f"{p.f_evals_mean:.2f}", f"{p.f_evals_p90:.0f}")
            lines.append(f"| {kind if i == 0 else ''} | {p.setting} | {p.top1:.2f} | {evals[0]} | {evals[1]} | {rate} |")
    return "\n".join(lines)


def _label(p: FrontierPoint) -> str:
    """The short label of a point in the picture: the budget or depth, or the rule."""
    if p.setting.startswith("none@"):
        return p.setting[len("none@"):]
    if p.setting.startswith("depth "):
        return p.setting[len("depth "):]
    return p.setting


def plot_frontier(points: Sequence[FrontierPoint], path: str, title: str = "", band: float = 1.0) -> str:
    """PNG at ``path``, two panels: top-1 against mean evaluations of f per image (the explicit networks
    as horizontal lines), and top-1 against images/s (the points that have a measured rate). Fixed
    budgets and depths are joined by lines and labelled by their number; per-sample rules are
    triangles. The y axis spans ``band`` points under the best top-1; the points below it are named
    in a note, not drawn."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    best = max((p.top1 for p in points if not math.isnan(p.top1)), default=100.0)
    low = best - band
    series = {"equilibrium, fixed budget": ([p for p in points if p.setting.startswith("none@")], "o", "C0"),
              "equilibrium, per-sample rule": ([p for p in points if p.forward == "equilibrium"
                                                and not p.setting.startswith("none@")], "^", "C2"),
              "unrolled stack, depth": ([p for p in points if p.forward == "unrolled"], "s", "C1")}
    fig, (ax_e, ax_r) = plt.subplots(1, 2, figsize=(11, 4.4))
    try:
        for name, (pts, marker, color) in series.items():
            shown = [p for p in pts if p.top1 >= low]
            joined = not name.endswith("rule")
            for ax, key in ((ax_e, "f_evals_mean"), (ax_r, "images_per_s")):
                xy = sorted((getattr(p, key), p.top1, p) for p in shown if getattr(p, key) is not None)
                if not xy:
                    continue
                ax.plot([v[0] for v in xy], [v[1] for v in xy], marker=marker, color=color,
                        linestyle="-" if joined and ax is ax_e else "none", label=name if ax is ax_e else None)
                if joined:
                    for x, y, p in xy:
                        ax.annotate(_label(p), (x, y), fontsize=8, color=color, xytext=(4, 3),
                                    textcoords="offset points")
        for p in points:
            if p.forward != "explicit":
                continue
            ax_e.axhline(p.top1, color="C3", linestyle="--", linewidth=1, label=f"{p.setting} (explicit)")
            if p.images_per_s is not None:
                ax_r.scatter(p.images_per_s, p.top1, marker="*", color="C3", s=120, zorder=3)
                ax_r.annotate(p.setting, (p.images_per_s, p.top1), fontsize=8, color="C3", xytext=(4, -11),
                              textcoords="offset points")
        below = [f"{p.setting} {p.top1:.1f}" for p in points if p.top1 < low]
        if below:
            ax_e.text(0.01, 0.99, "below the axis: " + ", ".join(below), transform=ax_e.transAxes, fontsize=7,
                      va="top")
        for ax in (ax_e, ax_r):
            ax.set_ylim(low, best + 0.25 * band)
            ax.set_ylabel("test top-1 (%)")
            ax.grid(True, alpha=0.3)
        ax_e.set_xlabel("mean evaluations of f per image")
        ax_r.set_xlabel("inference images/s (fixed budgets and depths)")
        ax_e.legend(fontsize="small", loc="lower right")
        if title:
            fig.suptitle(title, fontsize="medium")
        fig.tight_layout()
        replace_file(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path
