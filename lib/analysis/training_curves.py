"""A run's course, epoch by epoch, from its ``history.jsonl`` (written by the training engine): loss,
accuracy and the solvers' behaviour over a long run, several runs in one figure.

Each line of ``history.jsonl`` is one finished epoch: ``{"epoch", "global_step", "epoch_time_s",
"eval_time_s", "mode", "train": {...}, "held_out": {...}}``, ``mode`` what the epoch's last step
computed ('unrolled', 'equilibrium', or 'explicit' for a network without one), ``train`` holding the epoch's means (loss, top1,
f_steps, f_rel, b_steps, b_rel, jac_loss ...), ``held_out`` the evaluation's scalars (loss, top1,
f_steps, f_rel ...). A resumed run writes the epochs it trains again; the last line of an epoch counts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

#: the panels of :func:`plot_histories`: (title, [(section, key, line style)], logarithmic y axis)
PANELS: Tuple[Tuple[str, Sequence[Tuple[str, str, str]], bool], ...] = (
    ("top-1 (%) (train -, held-out --)", [("train", "top1", "-"), ("held_out", "top1", "--")], False),
    ("loss (train -, held-out --)", [("train", "loss", "-"), ("held_out", "loss", "--")], True),
    ("forward rel. residual at the budget (train -, held-out --)",
     [("train", "f_rel", "-"), ("held_out", "f_rel", "--")], True),
    ("forward steps to F_EPS or the budget (train -, held-out --)",
     [("train", "f_steps", "-"), ("held_out", "f_steps", "--")], False),
    ("backward rel. residual (train)", [("train", "b_rel", "-")], True),
    ("training time per epoch (s, no evaluation)", [("time", "train_s", "-")], False),
)


def find_history(run: Path) -> Path:
    """``run`` itself when it is a file, else the one ``history.jsonl`` below the folder ``run``.

    Raises:
        FileNotFoundError: there is none, or several (the message lists them).
    """
    run = Path(run)
    if run.is_file():
        return run
    found = sorted(run.glob("**/history.jsonl")) if run.is_dir() else []
    if len(found) != 1:
        what = "no history.jsonl" if not found else f"{len(found)} history.jsonl files ({', '.join(map(str, found))})"
        raise FileNotFoundError(f"{run}: {what}; give a run's output folder or its history.jsonl")
    return found[0]


def read_history(path: Path) -> List[Dict]:
    """The epochs of one ``history.jsonl``, in order, one entry per epoch (the last line of each), with
    ``time.train_s``: the epoch's seconds outside its held-out evaluation (when the line has both).

    Raises:
        ValueError: a line that is not JSON (named with its number).
    """
    by_epoch: Dict[int, Dict] = {}
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not a JSON line ({e})") from e
            if "eval_time_s" in entry and "epoch_time_s" in entry:
                entry["time"] = {"train_s": entry["epoch_time_s"] - entry["eval_time_s"]}
            by_epoch[int(entry["epoch"])] = entry
    return [by_epoch[e] for e in sorted(by_epoch)]


def series(history: Sequence[Dict], section: str, key: str) -> Tuple[List[int], List[float]]:
    """(epochs, values) of ``history[i][section][key]`` where present (epochs counted from 1)."""
    xs, ys = [], []
    for entry in history:
        value = (entry.get(section) or {}).get(key)
        if value is not None:
            xs.append(int(entry["epoch"]) + 1)
            ys.append(float(value))
    return xs, ys


def plot_histories(runs: Sequence[Tuple[str, Sequence[Dict]]], out: Path, title: Optional[str] = None) -> Path:
    """One figure of :data:`PANELS` with a line per (label, history) in ``runs``; written to ``out`` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles: Dict[int, Any] = {}   # run -> its first line, for the legend
    for ax, (panel, lines, log) in zip(axes.flat, PANELS):
        for i, (label, history) in enumerate(runs):
            for section, key, style in lines:
                xs, ys = series(history, section, key)
                if xs:
                    (line,) = ax.plot(xs, ys, style, marker=".", color=colours[i % len(colours)])
                    handles.setdefault(i, line)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("epoch")
        if log and ax.lines and all(y > 0 for line in ax.lines for y in line.get_ydata()):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    # labels given explicitly: matplotlib's own collection would drop one that starts with "_" ("_fast")
    fig.legend([handles[i] for i in sorted(handles)], [runs[i][0] for i in sorted(handles)], loc="lower center",
               ncol=min(4, max(1, len(handles))), fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97 if title else 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
