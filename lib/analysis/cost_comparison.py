"""Compare the training cost of gradient modes and regularisers on one machine, several seeds: on the
embedded digits (issue 14) or on Fashion-MNIST (issue 19; the reversible equilibrium, the Lipschitz MDEQ),
:data:`BENCHMARKS`.

Each variant is an experiment file plus config overrides; every (variant, seed) pair is one
``tools/cls_train.py`` run in a fresh process, its ``results.json`` (held-out top-1, mean forward
steps and relative residual of the final evaluation, wall time) appended as one JSON line to a
results file, so that an interrupted comparison keeps what it measured and the table can be
rebuilt from that file. Runs go seed by seed (all variants for seed 0, then seed 1, ...) so that
a slow phase of a shared machine hits every variant alike.
"""
from __future__ import annotations

import json
import logging
import math
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from .training_curves import read_history

logger = logging.getLogger(__name__)

METRICS = (("top1", "held-out top-1 (%)", "{:.2f}"), ("f_steps", "mean f steps (final eval)", "{:.2f}"),
           ("f_rel", "final rel. residual", "{:.2e}"), ("wall_time_s", "wall time (s)", "{:.1f}"))
#: read from the run's history.jsonl: the training means of its last epoch and the time spent outside the
#: held-out evaluations (columns of the table where a run has them)
HISTORY_METRICS = (("train_f_steps", "train f steps (last epoch)", "{:.2f}"),
                   ("train_f_rel", "train rel. residual (last epoch)", "{:.2e}"),
                   ("train_b_rel", "train backward rel. residual (last epoch)", "{:.2e}"),
                   ("train_b_steps", "train b steps (last epoch)", "{:.2f}"),
                   ("train_lipschitz_certified", "certified Lipschitz bound of f (last epoch)", "{:.3f}"),
                   ("train_lipschitz_empirical", "empirical ||J_f(z*)|| (last epoch)", "{:.3f}"),
                   ("train_f_evals", "train f evaluations, reversible (last epoch)", "{:.1f}"),
                   ("train_b_rev_error", "train reconstruction error, reversible (last epoch)", "{:.1e}"),
                   ("train_time_s", "training time (s, no evaluation)", "{:.1f}"))


@dataclass
class Variant:
    """One row of the comparison: a name, an experiment file and ``KEY VALUE`` overrides."""

    name: str
    cfg: str
    opts: List[str] = field(default_factory=list)


def digits_variants(repo: Path) -> List[Variant]:
    """The issue-14 comparison on the embedded digits: the quickstart (implicit gradient), the ``_fast``
    config (also with the quickstart's 6-layer warm-up), and each method on the quickstart's config
    (ordered so that a cut-short run has the baseline and the ``_fast`` config first)."""
    base = str(repo / "experiments/digits/cls_mdeq_digits.yaml")
    fast = str(repo / "experiments/digits/cls_mdeq_digits_fast.yaml")
    return [
        Variant("implicit (quickstart)", base),
        Variant("_fast config", fast),
        Variant("_fast, 6-layer warm-up", fast, ["MODEL.NUM_LAYERS", "6"]),
        Variant("phantom (k 5, tau 0.5)", base, ["MODEL.GRAD", "phantom", "MODEL.PHANTOM_STEPS", "5",
                                                 "MODEL.PHANTOM_TAU", "0.5"]),
        Variant("JFB", base, ["MODEL.GRAD", "jfb"]),
        Variant("JR (weight 1.0, freq 0.5)", base, ["MODEL.JAC_LOSS_WEIGHT", "1.0", "MODEL.JAC_LOSS_FREQ", "0.5"]),
        Variant("JFB + F_THRES 8", base, ["MODEL.GRAD", "jfb", "MODEL.F_THRES", "8"]),
    ]


#: the Fashion-MNIST comparison's schedule (issue 19), common to every variant: 5 epochs of a quarter of
#: the 55,000 training images (13,750, drawn by the run's SEED; 108 steps an epoch, the first epoch the
#: unrolled warm-up), each epoch's weights and the final ones evaluated on the 10,000 test images
#: (reported, nothing is chosen on them)
FASHION_SCHEDULE = ["PERCENT", "0.25", "TRAIN.END_EPOCH", "5", "TRAIN.PRETRAIN_STEPS", "108",
                    "DATASET.TEST_SET", "test"]


def fashion_mnist_variants(repo: Path) -> List[Variant]:
    """The issue-19 comparison on Fashion-MNIST (:data:`FASHION_SCHEDULE` added to each): the main config
    (implicit gradient), the ``_fast`` config, JFB (also with the ``_fast`` budgets), Jacobian regularisation at the main forward budget
    and at the lower one it is meant to allow, and the implicit gradient at that lower budget."""
    base = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist.yaml")
    fast = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist_fast.yaml")
    jr = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist_jr.yaml")
    return [Variant(name, cfg, opts + FASHION_SCHEDULE) for name, cfg, opts in (
        ("implicit (main config)", base, []),
        ("_fast config", fast, []),
        ("JFB", base, ["MODEL.GRAD", "jfb"]),
        ("JFB, _fast budgets", fast, ["MODEL.GRAD", "jfb"]),
        ("JR (_jr config)", jr, []),
        ("JR, F_THRES 6", jr, ["MODEL.F_THRES", "6"]),
        ("implicit, F_THRES 6", base, ["MODEL.F_THRES", "6"]),
    )]


def fashion_mnist_reversible_variants(repo: Path) -> List[Variant]:
    """The reversible equilibrium on Fashion-MNIST (issue 27; :data:`FASHION_SCHEDULE` added to each): the
    main config and the ``_fast`` config against the reversible config at a few numbers of coupled steps
    (docs/reversible.md: beyond about 4 steps at beta 0.8 float32 states drift, so the longer runs use
    beta 0.5 with float64 states)."""
    base = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist.yaml")
    fast = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist_fast.yaml")
    rev = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist_reversible.yaml")
    exact = ["MODEL.REV_BETA", "0.5", "MODEL.REV_FLOAT64_STATES", "True"]
    return [Variant(name, cfg, opts + FASHION_SCHEDULE) for name, cfg, opts in (
        ("implicit (main config)", base, []),
        ("_fast config", fast, []),
        ("reversible, 4 steps (config)", rev, []),
        ("reversible, 2 steps", rev, ["MODEL.F_THRES", "2"]),
        ("reversible, 8 steps, beta 0.5, float64 states", rev, ["MODEL.F_THRES", "8"] + exact),
    )]


def fashion_mnist_lipschitz_variants(repo: Path) -> List[Variant]:
    """The Lipschitz MDEQ on Fashion-MNIST (issue 43; :data:`FASHION_SCHEDULE` added to each): the released
    recipe (L-Broyden, 10 steps) against the contractive f with plain iteration under the a-priori budgets
    (the config), with Anderson under the same budgets, and at a lower target (fewer a-priori steps)."""
    main = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1.yaml")
    lip = str(repo / "experiments/fashion_mnist/cls_mdeq_fmnist_lipschitz.yaml")
    return [Variant(name, cfg, opts + FASHION_SCHEDULE) for name, cfg, opts in (
        ("released recipe (main config)", main, []),
        ("Lipschitz plain iteration (config)", lip, []),
        ("Lipschitz Anderson", lip, ["MODEL.F_SOLVER", "anderson", "MODEL.B_SOLVER", "anderson"]),
        ("Lipschitz TARGET 0.7", lip, ["MODEL.LIPSCHITZ.TARGET", "0.7"]),
    )]


#: ``--benchmark`` name -> (its variants, the baseline row's name)
BENCHMARKS = {"digits": (digits_variants, "implicit (quickstart)"),
              "fashion_mnist": (fashion_mnist_variants, "implicit (main config)"),
              "fashion_mnist_reversible": (fashion_mnist_reversible_variants, "implicit (main config)"),
              "fashion_mnist_lipschitz": (fashion_mnist_lipschitz_variants, "released recipe (main config)")}


def history_metrics(run_dir: Path) -> Dict[str, float]:
    """From a run's ``history.jsonl`` (:func:`~mdeq.analysis.training_curves.read_history`): the last
    epoch's training means of the forward steps, forward and backward relative residuals, and the seconds
    of all epochs outside their held-out evaluations."""
    found = sorted(run_dir.glob("**/history.jsonl"))
    if not found:
        return {}
    epochs = read_history(found[0])
    last = epochs[-1]["train"]
    out = {f"train_{k}": last[k] for k in ("f_steps", "f_rel", "b_rel", "b_steps", "f_evals", "b_rev_error",
                                           "lipschitz_certified", "lipschitz_empirical") if k in last}
    if all("time" in e for e in epochs):
        out["train_time_s"] = sum(e["time"]["train_s"] for e in epochs)
    return out


def run_one(variant: Variant, seed: int, out_root: Path, repo: Path) -> Dict:
    """Train ``variant`` with ``SEED seed`` in a fresh process; returns its results.json plus the run's ids."""
    slug = "".join(c if c.isalnum() else "_" for c in variant.name).strip("_")
    out = out_root / f"{slug}_seed{seed}"
    cmd = [sys.executable, str(repo / "tools/cls_train.py"), "--cfg", variant.cfg, *variant.opts,
           "SEED", str(seed), "OUTPUT_DIR", str(out) + "/", "LOG_DIR", str(out / "log") + "/"]
    logger.info("running %s", " ".join(cmd))
    with open(out_root / f"{slug}_seed{seed}.log", "w") as log:
        subprocess.run(cmd, cwd=repo, stdout=log, stderr=subprocess.STDOUT, check=True)
    found = sorted(out.glob("**/results.json"))
    if not found:
        raise FileNotFoundError(f"no results.json under {out} after training {variant.name!r} seed {seed}")
    with open(found[0]) as f:
        res = json.load(f)
    return {"variant": variant.name, "seed": seed, "num_samples": res.get("num_samples"),
            **{k: res.get(k) for k, _, _ in METRICS}, **history_metrics(out)}


def run_comparison(variants: Sequence[Variant], seeds: Sequence[int], out_root: Path, repo: Path) -> List[Dict]:
    """Every variant for every seed (seed-major order); each result is appended to ``out_root/runs.jsonl``."""
    out_root.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in seeds:
        for v in variants:
            row = run_one(v, seed, out_root, repo)
            rows.append(row)
            with open(out_root / "runs.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            logger.info("%s seed %d: %s", v.name, seed, row)
    return rows


def read_runs(path: Path) -> List[Dict]:
    """The rows of a ``runs.jsonl`` written by :func:`run_comparison`; the first row of a (variant, seed)
    pair when two runs wrote the same pair."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    seen, unique = set(), []
    for r in rows:
        if (r["variant"], r["seed"]) not in seen:
            seen.add((r["variant"], r["seed"]))
            unique.append(r)
    return unique


def _mean_std(values: List[float], fmt: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def wilson_interval(correct: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a proportion ``correct / n``, in percent."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100.0 * (centre - half), 100.0 * (centre + half)


def _pooled_interval(rs: Sequence[Dict]) -> str:
    """The 95 % interval of the top-1 over every test image of every seed (the seeds' images pooled)."""
    if not rs or any(not r.get("num_samples") for r in rs):
        return "-"
    n = sum(int(r["num_samples"]) for r in rs)
    low, high = wilson_interval(sum(r["top1"] / 100.0 * r["num_samples"] for r in rs), n)
    return f"{low:.2f}-{high:.2f}"


def format_table(rows: Sequence[Dict], baseline: str = "implicit (quickstart)") -> str:
    """A markdown table, one line per variant: mean ± std over seeds of each metric (and of the history
    metrics the runs have), the number of seeds, the 95 % binomial interval of the top-1 (Wilson, over
    the held-out images of all seeds together), and wall time and top-1 relative to ``baseline`` on the
    seeds that both have (a variant trained for fewer seeds is not set against the others' mean)."""
    names = list(dict.fromkeys(r["variant"] for r in rows))
    by = {n: [r for r in rows if r["variant"] == n] for n in names}
    base = {r["seed"]: r for r in by.get(baseline, [])}
    columns = list(METRICS) + [m for m in HISTORY_METRICS if any(m[0] in r for r in rows)]
    head = (["method", "seeds"] + [label for _, label, _ in columns] + ["top-1 95 % interval", "wall vs baseline",
                                                                          "top-1 vs baseline"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        rs = by[n]
        cells = [n, str(len(rs))]
        for key, _, fmt in columns:
            cells.append(_mean_std([float(r[key]) for r in rs if r.get(key) is not None], fmt))
        cells.append(_pooled_interval(rs))
        pairs = [(r, base[r["seed"]]) for r in rs if r["seed"] in base]
        if pairs:
            wall = sum(r["wall_time_s"] for r, _ in pairs) / sum(b["wall_time_s"] for _, b in pairs)
            cells += [f"{wall:.2f}x", f"{statistics.mean(r['top1'] - b['top1'] for r, b in pairs):+.2f}"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_out_root(repo: Path) -> Path:
    return Path(os.environ.get("MDEQ_COMPARE_OUT", repo / "output" / "training_cost"))
