"""The model tables (tools/model_zoo.py): README.md and pretrained_models/README.md hold what the tool
writes from pretrained_models/*.results.json; a results.json without a required field, a stale page
and a page without its markers are refused; an ``eval`` block adds the inference columns; results.json
of a training run records the commit and the CPU."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from mdeq.analysis import model_zoo
from mdeq.analysis.model_zoo import REQUIRED, ZooError, load_results, render, stale_pages, write_pages
from mdeq.programs.cli import run_tool
from mdeq.utils.provenance import cpu_bf16_features, git_commit, run_provenance

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "pretrained_models"
TOOL = REPO / "tools" / "model_zoo.py"


def _copy_repo(tmp_path: Path) -> Path:
    """The pages and the records of this repository under ``tmp_path``."""
    (tmp_path / "pretrained_models").mkdir()
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    for path in [MODELS / "README.md", MODELS / model_zoo.AUTHORS_FILE, *MODELS.glob("*.results.json")]:
        shutil.copy(path, tmp_path / "pretrained_models" / path.name)
    return tmp_path


def _tool_main():
    """tools/model_zoo.py's ``main``, loaded as the tool's file."""
    spec = importlib.util.spec_from_file_location("model_zoo_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_the_pages_hold_what_the_tool_writes():
    assert stale_pages(REPO) == [], "run python tools/model_zoo.py"
    assert run_tool(_tool_main(), ["--check"]) == 0


def test_every_results_json_has_the_required_fields_and_its_weights():
    records = load_results(REPO)
    assert [r["name"] for r in records] == ["cls_mdeq_fmnist_stem_bf16_erase_26ep_seed1"]
    for r in records:
        assert set(REQUIRED) <= set(r)
        assert (REPO / r["weights"]).is_file() and (REPO / r["config"]).is_file()
        assert (MODELS / f"{r['name']}_training.png").is_file()
        assert r["weights"] == f"pretrained_models/{r['name']}.pth"
        assert len(r["commit"]) >= 7 and set(r["cpu_bf16"]) <= {"AVX512-BF16", "AMX"}
    text = (REPO / "README.md").read_text()
    for r in records:   # the short form: its row and its evaluate command below the table, not in a cell
        row = next(line for line in text.splitlines() if line.startswith(f"| `{r['name']}`"))
        assert model_zoo.top1_with_interval(r) in row and "python" not in row and r["commit"] not in row
        assert f"    {model_zoo.evaluate_command(r)}" in text


def test_a_results_json_without_a_field_is_refused(tmp_path):
    repo = _copy_repo(tmp_path)
    [path] = (repo / "pretrained_models").glob("*.results.json")
    record = json.loads(path.read_text())
    for key in ("commit", "cpu_bf16", "sha256"):
        broken = {k: v for k, v in record.items() if k != key}
        path.write_text(json.dumps(broken))
        with pytest.raises(ZooError, match=f"{path.name} lacks {key}"):
            render(repo)
        assert run_tool(_tool_main(), ["--check", "--repo", str(repo)]) == 2
    path.write_text(json.dumps({**record, "threads": "2"}))
    with pytest.raises(ZooError, match=r"wrong type of threads \(str\)"):
        render(repo)
    path.write_text(json.dumps({**record, "eval": {"images_per_s": 300.0}}))
    with pytest.raises(ZooError, match=r"\(eval\) lacks eval_setting, mean_f_evals, test_top1"):
        render(repo)


def test_a_stale_page_is_found_and_rewritten(tmp_path):
    repo = _copy_repo(tmp_path)
    readme = repo / "README.md"
    shown = model_zoo.top1_with_interval(load_results(repo)[0])
    assert shown in readme.read_text()
    readme.write_text(readme.read_text().replace(shown, "99.99 % (99.98-100.00)"))
    assert stale_pages(repo) == [readme]
    assert run_tool(_tool_main(), ["--check", "--repo", str(repo)]) == 2
    assert write_pages(repo) == [readme]
    assert readme.read_text() == (REPO / "README.md").read_text() and stale_pages(repo) == []
    readme.write_text(readme.read_text().replace("<!-- end model_zoo short -->", ""))
    with pytest.raises(ZooError, match="README.md needs one pair of markers"):
        render(repo)


def test_an_eval_block_adds_the_inference_columns(tmp_path):
    repo = _copy_repo(tmp_path)
    [path] = (repo / "pretrained_models").glob("*.results.json")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "eval": {"eval_setting": "batch 500, F_THRES 10, 2 threads",
                                                   "images_per_s": 512.4, "mean_f_evals": 11.0,
                                                   "test_top1": 93.61}}))
    pages = render(repo)
    full = pages[repo / "pretrained_models" / "README.md"]
    assert "| inference (images/s) | f evaluations per image | test top-1 at it | inference setting |" in full
    assert "| 512 | 11.0 | 93.61 % | batch 500, F_THRES 10, 2 threads |" in full
    short = pages[repo / "README.md"]
    assert "| inference: images/s, f evaluations, top-1 |" in short and "| 512, 11.0, 93.61 % |" in short
    path.write_text(json.dumps({k: v for k, v in record.items() if k != "eval"}))
    full = render(repo)[repo / "pretrained_models" / "README.md"]
    assert "inference" not in full.split("end model_zoo full")[0].split("begin model_zoo full")[1]  # no block, no column


def test_a_run_records_its_commit_and_cpu():
    prov = run_provenance()
    assert set(prov) == {"commit", "cpu_model", "cpu_bf16", "threads", "torch"}
    assert prov["commit"] == git_commit() and prov["commit"] != "unknown"
    assert prov["cpu_bf16"] == cpu_bf16_features() and prov["threads"] >= 1
    assert git_commit(Path("/")) == "unknown"
