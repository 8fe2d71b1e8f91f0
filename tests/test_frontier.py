"""The accuracy/cost frontier is drawn from the runs' own files (tools/plot_frontier.py)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

from mdeq.analysis.frontier import collect_frontier, format_frontier_table
from mdeq.config import ConfigError


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def run_files(tmp_path):
    sweep = _write(tmp_path / "exit_sweep.json", {"rows": [
        {"setting": "none@2", "top1": 86.9, "f_evals_mean": 2.0, "f_evals_p90": 2.0, "images_per_s": 1.0, "f_rel": 0.8},
        {"setting": "none@4", "top1": 93.6, "f_evals_mean": 4.0, "f_evals_p90": 4.0, "images_per_s": 1.0, "f_rel": 0.1},
        {"setting": "prediction:3@10", "top1": 93.5, "f_evals_mean": 3.9, "f_evals_p90": 5.0, "images_per_s": 1.0,
         "f_rel": 0.1}]})
    unrolled = {3: _write(tmp_path / "u3.json", {"top1": 93.2, "f_evals_mean": 3.0})}
    costs = [_write(tmp_path / "c.json", [
        {"cfg": "experiments/a/mdeq.yaml", "forward": "equilibrium", "f_evals": 4, "images_per_s": 270.0},
        {"cfg": "experiments/a/mdeq.yaml", "forward": "equilibrium", "f_evals": 2, "images_per_s": 500.0},
        {"cfg": "experiments/a/mdeq_unrolled.yaml", "forward": "unrolled", "f_evals": 3, "images_per_s": 400.0},
        {"cfg": "experiments/a/resnet.yaml", "forward": "explicit", "f_evals": None, "images_per_s": 361.0}])]
    return sweep, unrolled, costs


def test_points_take_each_figure_from_the_file_that_measured_it(run_files):
    sweep, unrolled, costs = run_files
    points = collect_frontier(sweep, unrolled, costs, {"resnet.yaml": 93.52})
    by = {p.setting: p for p in points}
    assert [p.forward for p in points] == ["equilibrium"] * 3 + ["unrolled", "explicit"]
    # a fixed budget gets the rate of the cost row that ran exactly that many evaluations; a rule has none
    assert by["none@4"].images_per_s == 270.0 and by["none@2"].images_per_s == 500.0
    assert by["prediction:3@10"].images_per_s is None and by["prediction:3@10"].f_evals_p90 == 5.0
    assert by["depth 3"].top1 == 93.2 and by["depth 3"].images_per_s == 400.0
    assert by["resnet"].top1 == 93.52 and by["resnet"].images_per_s == 361.0
    table = format_frontier_table(points)
    assert "| equilibrium | none@2 | 86.90 | 2.00 | 2 | 500 |" in table
    assert "|  | prediction:3@10 | 93.50 | 3.90 | 5 | - |" in table
    assert "| explicit | resnet | 93.52 | - | - | 361 |" in table


def test_the_tool_draws_redraws_and_names_a_bad_file(run_files, tmp_path, repo):
    sweep, unrolled, costs = run_files
    png, pts = tmp_path / "f.png", tmp_path / "points.json"
    cmd = [sys.executable, str(repo / "tools/plot_frontier.py"), "--exit-sweep", sweep, "--unrolled", f"3={unrolled[3]}",
           "--costs", *costs, "--reference", "resnet.yaml=93.52", "--out", str(png), "--json", str(pts)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "|  | none@4 | 93.60 | 4.00 | 4 | 270 |" in out.stdout
    with Image.open(png) as img:
        assert img.size[0] > img.size[1] >= 300
    png.unlink()
    again = subprocess.run([sys.executable, str(repo / "tools/plot_frontier.py"), "--points", str(pts), "--out", str(png)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout == out.stdout and png.is_file()
    (tmp_path / "bad.json").write_text("{not json")
    bad = subprocess.run([sys.executable, str(repo / "tools/plot_frontier.py"), "--exit-sweep", str(tmp_path / "bad.json"),
                          "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "bad.json" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(ConfigError, match="empty.json"):
        collect_frontier(sweep, {3: _write(tmp_path / "empty.json", {})}, costs, {})
