"""Accuracy against the forward solver's budget: evaluate a model at several ``F_THRES`` values, or at
several evaluation settings (budget and per-sample exit rule, :class:`~mdeq.modules.early_exit.ExitSetting`)
to choose the one that reaches the best held-out top-1 at the fewest evaluations of f (:func:`choose_setting`).

Training and the original evaluate at one fixed threshold; this sweep shows what fewer solver
steps cost (and what more buy). It is generic in the evaluation: give it a callable
``evaluate(f_thres) -> dict`` (held-out top-1 for classification, mIoU for segmentation).

    rows = run_sweep(lambda t: validate(..., f_thres=t), [2, 4, 8, 16, 32], metric_key="top1")
    logger.info("\\n%s", format_sweep_table({"model.pth": rows}, "top-1 (%)"))
    plot_sweep({"model.pth": rows}, "sweep.png", "top-1 (%)")
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from ..config import ConfigError
from ..modules.early_exit import ExitSetting
from ..utils.output_files import replace_file, write_json

logger = logging.getLogger(__name__)


@dataclass
class SweepRow:
    """One forward budget: the metric, the mean relative residual and mean forward steps there."""

    budget: int
    metric: float
    rel_residual: float
    f_steps: float

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def parse_budgets(text: str) -> List[int]:
    """``"2,4,8"`` -> [2, 4, 8]; each budget a positive whole number."""
    try:
        budgets = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"--f-thres-sweep {text!r}: give comma-separated whole numbers, e.g. 2,4,8,16,32") from None
    if not budgets or min(budgets) < 1:
        raise ConfigError(f"--f-thres-sweep {text!r}: give at least one budget, each >= 1")
    return budgets


def run_sweep(evaluate: Callable[[int], Mapping[str, float]], budgets: Sequence[int], metric_key: str = "top1",
              residual_key: str = "f_rel", steps_key: str = "f_steps") -> List[SweepRow]:
    """Call ``evaluate(budget)`` for each budget; returns one :class:`SweepRow` per budget.

    Missing keys in a result become NaN (e.g. an evaluation that does not report residuals).
    """
    rows = []
    for b in budgets:
        res = evaluate(int(b))
        row = SweepRow(int(b), float(res.get(metric_key, math.nan)), float(res.get(residual_key, math.nan)),
                       float(res.get(steps_key, math.nan)))
        logger.info("F_THRES %d: %s %.4g, mean rel residual %.3g, mean f steps %.2f", b, metric_key, row.metric,
                    row.rel_residual, row.f_steps)
        rows.append(row)
    return rows


def format_sweep_table(rows_by_label: Mapping[str, Sequence[SweepRow]], metric_name: str) -> str:
    """A markdown table: one line per (model, budget)."""
    lines = [f"| model | F_THRES | {metric_name} | mean rel. residual | mean f steps |", "|---|---|---|---|---|"]
    for label, rows in rows_by_label.items():
        for r in rows:
            lines.append(f"| {label} | {r.budget} | {r.metric:.2f} | {r.rel_residual:.3g} | {r.f_steps:.2f} |")
    return "\n".join(lines)


def plot_sweep(rows_by_label: Mapping[str, Sequence[SweepRow]], path: str, metric_name: str,
               title: Optional[str] = None) -> str:
    """PNG at ``path``: the metric against the forward budget, one curve per model (log2 x axis)."""
    import matplotlib
    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for label, rows in rows_by_label.items():
            ax.plot([r.budget for r in rows], [r.metric for r in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("forward solver budget F_THRES (steps)")
        ax.set_ylabel(metric_name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        if title:
            ax.set_title(title)
        fig.tight_layout()
        replace_file(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def sweep_models(model_files: Sequence[str], load: Callable[[str], None], evaluate: Callable[[int], Mapping[str, float]],
                 budgets: Sequence[int], out_dir: str, metric_key: str, metric_name: str, write: bool = True,
                 stem: str = "f_thres_sweep") -> Dict[str, List[SweepRow]]:
    """Sweep every checkpoint: ``load(file)`` then :func:`run_sweep`; log the table and (``write``) save
    ``out_dir/<stem>.png`` (one curve per checkpoint) and ``out_dir/<stem>.json``.

    Returns the rows per checkpoint file.
    """
    import os

    by_file: Dict[str, List[SweepRow]] = {}
    for path in model_files:
        load(path)
        by_file[path] = run_sweep(evaluate, budgets, metric_key=metric_key)
    labels = _short_labels(list(by_file))
    table = {labels[p]: rows for p, rows in by_file.items()}
    logger.info("%s against the forward budget:\n%s", metric_name, format_sweep_table(table, metric_name))
    if write:
        png = plot_sweep(table, os.path.join(out_dir, f"{stem}.png"), metric_name)
        write_json(os.path.join(out_dir, f"{stem}.json"),
                   {p: [r.as_dict() for r in rows] for p, rows in by_file.items()}, indent=2)
        logger.info("sweep plot %s, rows %s", png, os.path.join(out_dir, f"{stem}.json"))
    return by_file


@dataclass
class ExitSweepRow:
    """One evaluation setting: held-out top-1 (%), evaluations of f per image (mean, 90th percentile),
    images/s and the mean relative residual."""

    setting: str
    top1: float
    f_evals_mean: float
    f_evals_p90: float
    images_per_s: float
    f_rel: float

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def parse_exit_settings(text: str, base: ExitSetting) -> List[ExitSetting]:
    """``"none@4,prediction:2@10"`` -> the settings (:meth:`ExitSetting.parse`; unset fields from ``base``)."""
    settings = [ExitSetting.parse(t, base) for t in text.split(",") if t.strip()]
    if not settings:
        raise ConfigError(f"--exit-sweep {text!r}: give at least one setting, e.g. none@4,prediction:2@10")
    return settings


def run_exit_sweep(evaluate: Callable[[ExitSetting], Mapping[str, float]], settings: Sequence[ExitSetting]
                   ) -> List[ExitSweepRow]:
    """``evaluate(setting)`` for each setting (a result with ``top1``, ``f_evals_mean``, ``f_evals_p90``,
    ``images_per_s``, ``f_rel``; missing ones NaN); one row each."""
    rows = []
    for setting in settings:
        res = evaluate(setting)
        row = ExitSweepRow(setting.label(), *(float(res.get(k, math.nan)) for k in
                                              ("top1", "f_evals_mean", "f_evals_p90", "images_per_s", "f_rel")))
        logger.info("%s: top-1 %.2f%%, f evaluations per image mean %.2f p90 %.0f, %.1f images/s", row.setting,
                    row.top1, row.f_evals_mean, row.f_evals_p90, row.images_per_s)
        rows.append(row)
    return rows


def choose_setting(rows: Sequence[ExitSweepRow], slack: float = 0.0) -> ExitSweepRow:
    """The row with the fewest mean evaluations of f among those whose top-1 is within ``slack`` points
    of the best (``0``: the best itself); ties go to the higher top-1, then to the earlier row."""
    if not rows:
        raise ValueError("choose_setting: no rows")
    best = max(r.top1 for r in rows)
    near = [(r.f_evals_mean, -r.top1, i) for i, r in enumerate(rows) if r.top1 >= best - slack - 1e-9]
    return rows[min(near)[2]]


def format_exit_table(rows: Sequence[ExitSweepRow], chosen: Optional[ExitSweepRow] = None) -> str:
    """A markdown table, one line per setting; the chosen one in bold."""
    lines = ["| setting | top-1 (%) | mean f evals / image | p90 f evals / image | images/s |", "|---|---|---|---|---|"]
    for r in rows:
        name = f"**{r.setting}**" if r is chosen else r.setting
        lines.append(f"| {name} | {r.top1:.2f} | {r.f_evals_mean:.2f} | {r.f_evals_p90:.0f} | {r.images_per_s:.1f} |")
    return "\n".join(lines)


def _short_labels(paths: List[str]) -> Dict[str, str]:
    """File names as curve labels; the full path where two files share a name."""
    import os
    names = [os.path.basename(p) for p in paths]
    return {p: (n if names.count(n) == 1 else p) for p, n in zip(paths, names)}
