"""The model zoo: the tables of released models, written from the models' own records.

Every released model has ``pretrained_models/<name>.results.json`` beside its weights: the figures of
its test evaluation and of its training run, the CPU and code it was trained with and the weights'
SHA-256 (:data:`REQUIRED`). The authors' checkpoints, which are not in the clone, are listed in
``pretrained_models/authors_release.json`` with the paper's figures. From these two sources this module
writes three tables between marker comments (``<!-- begin model_zoo NAME ... -->`` and
``<!-- end model_zoo NAME -->``):

* ``full`` (``pretrained_models/README.md``): one row per released model with every figure, the CPU,
  threads, commit and the evaluate command;
* ``authors`` (``pretrained_models/README.md``): the authors' checkpoints, their configs and the paper's
  figures;
* ``short`` (``README.md``): one row per model, ours and the authors', figures only, the evaluate
  commands below the table.

A results.json may carry an ``eval`` block (``eval_setting``, ``images_per_s``, ``mean_f_evals``,
``test_top1``): the test evaluation at the inference setting that the model's config carries (chosen on
the validation split), with its speed, shown in its own columns where any model has one.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..config.loader import ConfigError
from .cost_comparison import wilson_interval

logger = logging.getLogger(__name__)

MODELS_DIR = "pretrained_models"
AUTHORS_FILE = "authors_release.json"
#: the authors' release page (their README's "Pre-trained Models" table links the files)
AUTHORS_RELEASE = "https://github.com/locuslab/mdeq#pre-trained-models"
PAPER = "https://arxiv.org/abs/2006.08656"
#: the keys every results.json must have, and their JSON types
REQUIRED: Dict[str, Tuple[type, ...]] = {
    "config": (str,), "weights": (str,), "sha256": (str,), "dataset": (str,), "test_set": (str,),
    "test_top1": (int, float), "test_images": (int,), "test_f_steps": (int, float), "test_f_rel": (int, float),
    "parameters": (int,), "wall_time_s": (int, float), "cpu_model": (str,), "cpu_bf16": (list,),
    "threads": (int,), "torch": (str,), "commit": (str,)}
#: the keys of the optional ``eval`` block
EVAL_KEYS: Dict[str, Tuple[type, ...]] = {"eval_setting": (str,), "images_per_s": (int, float),
                                          "mean_f_evals": (int, float), "test_top1": (int, float)}
#: the keys every entry of authors_release.json must have
AUTHORS_REQUIRED: Dict[str, Tuple[type, ...]] = {
    "file": (str,), "model": (str,), "config": (str,), "dataset": (str,), "parameters": (int,),
    "paper_figure": (str,), "paper_table": (str,), "f_thres": (int,), "tool": (str,)}
#: which page holds which table
PAGES: Dict[str, Tuple[str, ...]] = {"README.md": ("short",), f"{MODELS_DIR}/README.md": ("full", "authors")}


class ZooError(ConfigError):
    """A results.json or authors_release.json that lacks a field, or a page without its markers."""


def _check_fields(record: Dict[str, Any], required: Dict[str, Tuple[type, ...]], where: str) -> None:
    """Raise :class:`ZooError` naming every key of ``required`` that ``record`` lacks or has of another type."""
    missing = [k for k in required if record.get(k) is None]
    if missing:
        raise ZooError(f"{where} lacks {', '.join(missing)}")
    wrong = [f"{k} ({type(record[k]).__name__})" for k, types in required.items()
             if not isinstance(record[k], types) or (isinstance(record[k], bool))]
    if wrong:
        raise ZooError(f"{where}: wrong type of {', '.join(wrong)}")


def validate_results(record: Dict[str, Any], where: str) -> None:
    """Check one results.json: every key of :data:`REQUIRED`, and a whole ``eval`` block where there is one.

    Raises:
        ZooError: a key is missing or of another type.
    """
    _check_fields(record, REQUIRED, where)
    if "eval" in record:
        _check_fields(record["eval"], EVAL_KEYS, f"{where} (eval)")


def load_results(repo: Path) -> List[Dict[str, Any]]:
    """Every ``pretrained_models/*.results.json`` of ``repo``, checked, best test top-1 first; each
    with ``name``, the file name without ``.results.json``."""
    records = []
    for path in sorted((repo / MODELS_DIR).glob("*.results.json")):
        record = json.loads(path.read_text())
        validate_results(record, str(path.relative_to(repo)))
        records.append({**record, "name": path.name[:-len(".results.json")]})
    return sorted(records, key=lambda r: -r["test_top1"])


def load_authors(repo: Path) -> List[Dict[str, Any]]:
    """The entries of ``pretrained_models/authors_release.json``, checked."""
    path = repo / MODELS_DIR / AUTHORS_FILE
    entries = json.loads(path.read_text())
    for i, entry in enumerate(entries):
        _check_fields(entry, AUTHORS_REQUIRED, f"{path.relative_to(repo)} entry {i}")
    return entries


def evaluate_command(record: Dict[str, Any]) -> str:
    """The command that evaluates a released model on its test set."""
    return (f"python tools/cls_valid.py --cfg {record['config']} --testModel {record['weights']} "
            f"DATASET.TEST_SET {record['test_set']}")


def authors_command(entry: Dict[str, Any]) -> str:
    """The command that evaluates one of the authors' checkpoints once it is downloaded."""
    return f"python {entry['tool']} --cfg {entry['config']} --testModel {MODELS_DIR}/{entry['file']}"


def top1_with_interval(record: Dict[str, Any]) -> str:
    """The test top-1 and its 95 % (Wilson) interval over the test images, e.g. ``93.52 % (93.02-93.99)``."""
    n = record["test_images"]
    low, high = wilson_interval(round(record["test_top1"] * n / 100.0), n)
    return f"{record['test_top1']:.2f} % ({low:.2f}-{high:.2f})"


def training_time(record: Dict[str, Any]) -> str:
    """The run's wall time in minutes, and the precision it trained in where not float32."""
    dtype = record.get("train_dtype", "float32")
    return f"{record['wall_time_s'] / 60:.1f} min" + ("" if dtype == "float32" else f" in {dtype}")


def cpu_name(record: Dict[str, Any]) -> str:
    """The CPU with its bfloat16 hardware, e.g. ``Intel Xeon Processor (AVX512-BF16, AMX)``."""
    name = re.sub(r"\s*\((R|TM)\)", "", record["cpu_model"]).strip() or "unknown CPU"
    return f"{name} ({', '.join(record['cpu_bf16']) or 'no bfloat16 hardware'})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> List[str]:
    """A markdown table; the columns numbered in ``right`` are right-aligned."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    return ["| " + " | ".join(cells) + " |" for cells in (header, rule, *rows)]


def _has_eval(records: Sequence[Dict[str, Any]]) -> bool:
    return any("eval" in r for r in records)


def full_table(records: Sequence[Dict[str, Any]]) -> str:
    """The table of ``pretrained_models/README.md``: every figure of every released model."""
    header = ["model", "config", "dataset", "parameters", "test top-1 (95 % interval)", "float32 top-1",
              "forward steps / rel. residual (test)", "training wall time", "CPU (bfloat16 hardware)", "threads",
              "commit"]
    if _has_eval(records):
        header += ["inference (images/s)", "f evaluations per image", "test top-1 at it", "inference setting"]
    header.append("evaluate")
    rows = []
    for r in records:
        f32 = r.get("test_float32", {}).get("top1")
        row = [f"`{r['name']}`", f"`{r['config']}`", f"{r['dataset']}, {r['test_images']:,} {r['test_set']}",
               f"{r['parameters']:,}", top1_with_interval(r), "-" if f32 is None else f"{f32:.2f} %",
               f"{r['test_f_steps']:.2f} / {r['test_f_rel']:.1e}", f"{r['wall_time_s']:,.0f} s ({training_time(r)})",
               cpu_name(r), str(r["threads"]), r["commit"]]
        if _has_eval(records):
            e = r.get("eval")
            row += ([f"{e['images_per_s']:,.0f}", f"{e['mean_f_evals']:.1f}", f"{e['test_top1']:.2f} %",
                     e["eval_setting"]] if e else ["-", "-", "-", "-"])
        row.append(f"`{evaluate_command(r)}`")
        rows.append(row)
    return "\n".join(_table(header, rows, right=(3,)))


def authors_table(entries: Sequence[Dict[str, Any]]) -> str:
    """The table of the authors' checkpoints: config, dataset, parameters, the paper's figure."""
    header = ["file (the authors' release)", "model", "config", "dataset", "parameters", "the paper's figure",
              "forward budget (`MODEL.F_THRES`)", "evaluate"]
    rows = [[f"[`{e['file']}`]({AUTHORS_RELEASE})", e["model"], f"`{e['config']}`", e["dataset"],
             f"{e['parameters']:,}", f"{e['paper_figure']} ([paper]({PAPER}), {e['paper_table']})",
             str(e["f_thres"]), f"`{authors_command(e)}`"] for e in entries]
    return "\n".join(_table(header, rows, right=(4, 6)))


def short_table(records: Sequence[Dict[str, Any]], entries: Sequence[Dict[str, Any]]) -> str:
    """README.md's table: one row per model, its figures only; the evaluate commands below it."""
    header = ["model", "dataset", "parameters", "accuracy (95 % interval)", "forward steps", "training"]
    if _has_eval(records):
        header.append("inference: images/s, f evaluations, top-1")
    rows = []
    for r in records:
        row = [f"`{r['name']}` (in the clone)", r["dataset"], f"{r['parameters']:,}",
               f"{top1_with_interval(r)} top-1", f"{r['test_f_steps']:.2f}",
               f"{training_time(r)}, {r['threads']} CPU threads"]
        if _has_eval(records):
            e = r.get("eval")
            row.append(f"{e['images_per_s']:,.0f}, {e['mean_f_evals']:.1f}, {e['test_top1']:.2f} %" if e else "-")
        rows.append(row)
    for e in entries:
        row = [f"{e['model']}, [the authors']({AUTHORS_RELEASE})", e["dataset"], f"{e['parameters']:,}",
               f"{e['paper_figure']} (the paper's {e['paper_table']})", f"{e['f_thres']} (budget)", "-"]
        if _has_eval(records):
            row.append("-")
        rows.append(row)
    commands = [evaluate_command(r) for r in records] + [authors_command(e) for e in entries]
    return "\n".join(_table(header, rows, right=(2,)) + ["", "Evaluate (the authors' files downloaded into "
                                                             f"`{MODELS_DIR}/` first):", ""]
                     + [f"    {c}" for c in commands])


def replace_block(text: str, name: str, body: str, where: str) -> str:
    """``text`` with what stands between the markers of table ``name`` replaced by ``body``.

    Raises:
        ZooError: ``text`` lacks the markers, or has them more than once.
    """
    pattern = re.compile(r"(<!-- begin model_zoo %s[^>]*-->\n)(?:.*?\n)?(<!-- end model_zoo %s -->)" % (name, name),
                         re.S)
    if len(pattern.findall(text)) != 1:
        raise ZooError(f"{where} needs one pair of markers '<!-- begin model_zoo {name} ... -->' and "
                       f"'<!-- end model_zoo {name} -->'")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)


def render(repo: Path) -> Dict[Path, str]:
    """The text each page of :data:`PAGES` should have: its present text with its tables written anew."""
    records, entries = load_results(repo), load_authors(repo)
    bodies = {"full": full_table(records), "authors": authors_table(entries), "short": short_table(records, entries)}
    out = {}
    for page, names in PAGES.items():
        text = (repo / page).read_text()
        for name in names:
            text = replace_block(text, name, bodies[name], page)
        out[repo / page] = text
    return out


def stale_pages(repo: Path) -> List[Path]:
    """The pages whose tables differ from what :func:`render` writes."""
    return [path for path, text in render(repo).items() if path.read_text() != text]


def write_pages(repo: Path) -> List[Path]:
    """Write the tables into their pages; returns the pages that changed."""
    changed = []
    for path, text in render(repo).items():
        if path.read_text() != text:
            path.write_text(text)
            changed.append(path)
    return changed
