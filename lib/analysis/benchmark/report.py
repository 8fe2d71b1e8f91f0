"""The report of a benchmark run: markdown tables, and the result as JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

from .backward_modes import format_backward_modes
from .reversible import format_reversible
from .timing import READ_RATE_BYTES


def _ms(t: float) -> str:
    return f"{1e3 * t:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _header_and_components(r: Dict[str, Any]) -> List[str]:
    spec = r["spec"]
    lines = [f"**{Path(spec['cfg']).name}**, batch {spec['batch_size']}, {spec['image_size']}x{spec['image_size']}, "
             f"{spec['device']} ({r['device_name']}, {r['threads']} threads), torch {r['torch']}, "
             f"weights: {Path(spec['test_model']).name if spec['test_model'] else 'random init'}, "
             f"images: {Path(spec['images']).name if spec.get('images') else 'photo crops'}, "
             f"T_f={r['f_thres']}, T_b={r['b_thres']}, MODEL.COMPILE {r.get('compile', False)}", ""]
    if "read_rate" in r:
        lines += [f"Memory read rate: {r['read_rate'] / 1e9:.1f} GB/s "
                  f"(a sum over {READ_RATE_BYTES // 2 ** 20} MiB).", ""]
    comp = r.get("components")
    if comp:
        lines += ["| component | time (ms) |", "|---|---:|",
                  f"| one f evaluation (no grad) | {_ms(comp['f'])} |",
                  f"| one VJP J^T w (adjoint step) | {_ms(comp['vjp'])} (VJP/f = {comp['vjp'] / comp['f']:.2f}) |",
                  f"| f with autograd + its backward | {_ms(comp['f_graph_bwd'])} |",
                  f"| stem + head, forward + backward | {_ms(comp['stem_head'])} |", ""]
    return lines


def _forward_table(r: Dict[str, Any]) -> List[str]:
    lines = [f"Forward solve (eval mode), exactly {r['f_thres']} f evaluations each (tolerance 0):", "",
             "| solver | rel. residual | abs. residual | time (ms) | ms / eval | solver's own time | own / f "
             "| history floor / f |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, fw in r["forward"].items():
        floor = _pct(fw["history_floor"] / fw["in_f"]) if "history_floor" in fw else "-"
        lines.append(f"| {name} | {fw['rel']:.2e} | {fw['abs']:.2e} | {_ms(fw['time'])} | "
                     f"{_ms(fw['time'] / max(1, fw['steps']))} | {100 * fw['solver'] / fw['time']:.1f}% | "
                     f"{100 * fw['solver'] / fw['in_f']:.1f}% | {floor} |")
    return lines + ["", "own / f: the solver's own time over the time in f; history floor / f: the history "
                    "its steps must read at the memory read rate, over the time in f, the least own / f of "
                    "the method at this memory.", ""]


def _train_table(r: Dict[str, Any]) -> List[str]:
    lines = ["Training step (forward solve + head + loss + implicit backward; same solver forward and backward):",
             "", "| solver | step (ms) | T_f used | T_b used | f / VJP in step (ms) | f rel | b rel | overhead "
             "| floor | vs limit | in solver | history floor |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, st in r.get("train", {}).items():
        s = st["stats"]
        in_step = (f"{_ms(st['t_f_step'])} / {_ms(st['t_b_step'])}" if "t_f_step" in st and "t_b_step" in st
                   else "-")
        lines.append(f"| {name} | {_ms(st['time'])} | {s.get('f_steps')} | {s.get('b_steps')} | {in_step} | "
                     f"{s.get('f_rel', float('nan')):.1e} | {s.get('b_rel', float('nan')):.1e} | "
                     f"{100 * st['overhead']:.1f}% | {100 * st['floor']:.1f}% | {100 * st['vs_limit']:.1f}% | "
                     f"{100 * st['in_solver']:.1f}% | {_pct(st.get('history_floor'))} |")
    if "unrolled" in r:
        un, t_f = r["unrolled"], r["components"]["f"]
        lines.append(f"| unrolled warm-up, depth {r['f_thres']} (backprop) | {_ms(un['time'])} | {r['f_thres']} | - "
                     f"| - | - | - | {100 * (un['time'] / ((2 * r['f_thres']) * t_f) - 1):.1f}%* | - | - | - | - |")
    return lines + ["", "overhead = step / ((T_f + T_b + 2) x t_f) - 1; vs limit = step / (T_f t_f + T_b t_vjp + "
                    "t_f,graph+bwd + t_stem+head) - 1, with t_f and t_vjp timed inside the steps; floor = that limit / "
                    "((T_f + T_b + 2) x t_f) - 1, the overhead of a solver that cost nothing itself; in solver = time "
                    "inside the solvers outside f / step; history floor = the history the two solves must read at the "
                    "memory read rate / limit, the least vs limit of the method at this memory. *unrolled: step / "
                    "(2 x depth x t_f) - 1, t_f from the component table.", ""]


def _memory_table(r: Dict[str, Any]) -> List[str]:
    where = ("CUDA max_memory_allocated, in this process" if r["spec"]["device"].startswith("cuda")
             else "peak RSS, fresh process per row")
    lines = [f"Peak memory of one training step ({where}); the solver history (L-Broyden: "
             "2 min(m + 1, T) + 1 rows of B x D) is the only part of an implicit step that depends on T:", "",
             "| mode | T_f = T_b (or depth) | steps used f / b | step peak (MiB) | solver history (MiB) "
             "| step peak - history (MiB) | process peak (MiB) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in r["memory"]:
        s = m["stats"]
        used = f"{s.get('f_steps')} / {s.get('b_steps', '-')}"
        hist = m.get("history_mib", 0.0)
        lines.append(f"| {m['mode']} | {m['thres']} | {used} | {m['step_peak_mib']:.0f} | {hist:.0f} | "
                     f"{m['step_peak_mib'] - hist:.0f} | {m['process_peak_mib']:.0f} |")
    return lines


def format_report(r: Dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_benchmark` result (the tables of the parts it ran)."""
    lines = _header_and_components(r)
    if "forward" in r:
        lines += _forward_table(r)
    if "train" in r or "unrolled" in r:
        lines += _train_table(r)
    if "memory" in r:
        lines += _memory_table(r)
    if r.get("backward_modes"):
        lines.append(format_backward_modes(r["backward_modes"], r["f_thres"]))
    if r.get("reversible"):
        lines.append(format_reversible(r["reversible"]))
    if "wall_s" in r:
        lines.append(f"({r['wall_s']:.0f} s wall.)")
    return "\n".join(lines)


def dump_json(r: Any, path: str | Path) -> None:
    """Write a measurement's result (JSON-able: :func:`run_benchmark`'s dict, :func:`model_costs`' rows) as
    JSON, making its folder."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(r, indent=1, default=str))
