"""Every failure a user can cause gets one clear line (issue 15): out-of-range settings, files that
are not checkpoints, label images that are not label ids, a full disk, the solver tools' inputs,
and keys of the original's config that do nothing here.

The tools run as subprocesses, exactly as a user runs them; each bad input must end with exit
status 2 and one ``error:`` line that names the key / file / value, with no traceback.
"""
from __future__ import annotations

import ast
import errno
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch

from conftest import SEG_CFG, build_cityscapes_tree, one_error_line, patched_tool, run_process
from mdeq.config import CHOICES, RANGES, ConfigError, get_default_config, load_config
from mdeq.config.original import IGNORED, RENAMED
from mdeq.programs.cli import run_tool
from mdeq.datasets.cityscapes import LIST_PATTERN, CityscapesDataset, CityscapesError
from mdeq.datasets.common import split_path
from mdeq.utils.checkpoint import CheckpointError, CheckpointWriteError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DIGITS = str(REPO / "experiments/digits/cls_mdeq_digits.yaml")


@pytest.fixture(scope="module")
def junk(tmp_path_factory) -> Path:
    """Files a user may pass by mistake where a checkpoint or a recorded batch belongs."""
    d = tmp_path_factory.mktemp("junk")
    (d / "notes.txt").write_text("hello world\nthese are my notes\n")
    (d / "config.yaml").write_text(Path(DIGITS).read_text())
    (d / "results.json").write_text(json.dumps({"top1": 99.3}))
    assert cv2.imwrite(str(d / "picture.png"), np.zeros((8, 8, 3), np.uint8))
    (d / "empty.pth").write_bytes(b"")
    (d / "a_run").mkdir()
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, d / "weights.pth")
    return d


# ------------------------------------------------------------------------------- config file, overrides
@pytest.mark.slow
def test_config_file_and_override_slips_say_what_to_do(tmp_path):
    from mdeq.programs.launch import base_parser, config_from_args, parse_args
    (tmp_path / "empty.yaml").write_text("# nothing yet\n")
    with pytest.raises(ConfigError, match="empty.yaml is empty \\(no config keys\\): give an experiment file"):
        load_config(tmp_path / "empty.yaml")
    with pytest.raises(ConfigError, match=r"config file .*experiments/digits is a folder: give one yaml file in it "
                                          r"\(cls_mdeq_digits.yaml, "):
        load_config(REPO / "experiments" / "digits")
    with pytest.raises(ConfigError, match="on the command line write False, as Python does, not false"):
        load_config(DIGITS, ["DATASET.AUGMENT", "false"])
    for words, missing in ((["TRAIN.END_EPOCH", "3", "TRAIN.LR"], "TRAIN.LR"),
                           (["TRAIN.LR", "TRAIN.END_EPOCH", "3"], "TRAIN.LR")):
        args = parse_args(base_parser("x"), ["--cfg", DIGITS, "--modelDir", str(tmp_path / "o"), *words])
        with pytest.raises(ConfigError) as err:
            config_from_args(args)
        assert f"in {' '.join(words)!r} {missing} has no value" in str(err.value)
        assert "OUTPUT_DIR" not in str(err.value)   # the option's own key is not the user's word
    proc = run_process([sys.executable, "tools/cls_train.py", "--cfg", REPO / "experiments", "--modelDir",
                        tmp_path / "o"], expect=None)
    one_error_line(proc, "ConfigError", "is a folder")
    assert not (tmp_path / "o").exists()


def test_a_truncated_checkpoint_without_other_states_says_how_to_go_on(tmp_path):
    from mdeq.core.checkpoint_manager import resume_checkpoint
    (tmp_path / "checkpoint.pth.tar").write_bytes(b"PK\x03\x04 cut short")
    save_checkpoint({"model": {"w": torch.ones(1)}, "top1": 50.0}, tmp_path / "model_best.pth.tar")
    cfg = load_config(DIGITS, ["TRAIN.RESUME", True])
    with pytest.raises(CheckpointError) as err:
        resume_checkpoint(str(tmp_path), cfg, True, "cpu")
    text = str(err.value)
    assert "truncated or corrupt" in text and f"No other training state is in {tmp_path}" in text
    assert f"move {tmp_path / 'checkpoint.pth.tar'} away and train afresh without TRAIN.RESUME" in text
    assert "starting from the weights of model_best.pth.tar with TRAIN.MODEL_FILE" in text


# ------------------------------------------------------------------------------------- config rows
@pytest.mark.parametrize("key,value,allowed", [
    ("MODEL.F_THRES", "-5", "in [1, 10000]"),
    ("MODEL.F_THRES", "1000000000", "in [1, 10000]"),
    ("MODEL.F_THRES", "0", "in [1, 10000]"),
    ("MODEL.B_THRES", "0", "in [1, 10000]"),
    ("MODEL.F_EPS", "-1", ">= 0"),
    ("MODEL.B_EPS", "-1", ">= 0"),
    ("TRAIN.BATCH_SIZE_PER_GPU", "0", ">= 1"),
])
@pytest.mark.slow
def test_out_of_range_setting_is_one_line_naming_key_value_and_range(tmp_path, key, value, allowed):
    proc = run_process([sys.executable, "tools/cls_train.py", "--cfg", DIGITS, "--modelDir", tmp_path / "o",
                        "--logDir", tmp_path / "l", key, value], expect=None)
    line = one_error_line(proc, "ConfigError", f"{key} = {value}", allowed)
    assert "out of range" in line
    assert not (tmp_path / "o").exists()  # nothing written


def _outside(rng, default):
    """A value of the default's type just outside ``rng``."""
    if rng.negative_means:  # below 0 is a special value: go between 0 and the range, or above it
        bad = 0 if rng.low > 0 else rng.high * 2 + 1
    elif rng.low is not None:
        bad = rng.low if rng.low_open else rng.low - (1 if isinstance(default, int) or rng.low >= 1 else 0.5)
    else:
        bad = rng.high * 2 + 1
    return float(bad) if isinstance(default, float) else int(bad)


@pytest.mark.parametrize("key", sorted(RANGES))
def test_every_range_rejects_a_value_outside_it(key):
    rng, default = RANGES[key], get_default_config()
    for part in key.split("."):
        default = default[part]
    sample = default[0] if isinstance(default, (list, tuple)) else default
    bad = _outside(rng, sample)
    value = [bad] * len(default) if isinstance(default, (list, tuple)) else bad
    with pytest.raises(ConfigError) as err:
        load_config(DIGITS, [key, repr(value)])
    assert f"{key} = " in str(err.value) and repr(bad) in str(err.value) and rng.describe() in str(err.value)
    assert not rng.contains(bad) and rng.contains(sample)
    if rng.low is not None and not rng.low_open:
        assert rng.contains(rng.low)


def test_choices_and_cross_key_checks():
    with pytest.raises(ConfigError, match=r"FULL_STAGE\.BLOCK = 'BOTTLENECK'; choose one of \('BASIC',\)"):
        load_config(DIGITS, ["MODEL.EXTRA.FULL_STAGE.BLOCK", "BOTTLENECK"])
    with pytest.raises(ConfigError, match="TRAIN.END_EPOCH = 3 must be greater than TRAIN.BEGIN_EPOCH = 3"):
        load_config(DIGITS, ["TRAIN.BEGIN_EPOCH", "3", "TRAIN.END_EPOCH", "3"])
    # special values documented in the config table stay allowed
    cfg = load_config(DIGITS, ["MODEL.SOLVER_MEMORY", "0", "TRAIN.MAX_ITERS", "-1", "MODEL.BN_MOMENTUM", "-1",
                               "TRAIN.CLIP", "-1", "MODEL.F_EPS", "0"])
    assert cfg.MODEL.SOLVER_MEMORY == 0 and cfg.TRAIN.MAX_ITERS == -1
    assert set(CHOICES) <= _default_keys()


# ------------------------------------------------------------------------------- dead config keys
def _default_keys(node=None, prefix: str = "") -> set:
    node = get_default_config() if node is None else node
    out = set()
    for k, v in node.items():
        out |= _default_keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
    return out


def _attribute_chain(node: ast.AST) -> List[str]:
    """``cfg.MODEL.F_THRES`` -> ['cfg', 'MODEL', 'F_THRES'] ([] when the chain does not start at a name)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return [node.id, *parts[::-1]] if isinstance(node, ast.Name) else []


def _key_path(parts: List[str], sections: dict) -> List[str]:
    """The config path a chain reads: from its first upper-case part (``self.cfg.TRAIN.LR`` ->
    TRAIN.LR), or through a name bound to a section (``m = cfg.MODEL``; ``m.F_THRES`` -> MODEL.F_THRES)."""
    if parts and parts[0] in sections:
        return sections[parts[0]] + parts[1:]
    return next((parts[i:] for i, p in enumerate(parts) if p.isupper()), [])


def read_config_keys(tree: ast.AST) -> set:
    """The full config keys a module reads by attribute: ``cfg.TRAIN.RESUME``, or a section bound to
    a name and then its key (``t = cfg.TRAIN`` ... ``t.WD``)."""
    sections = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            path = _key_path(_attribute_chain(node.value), {})
            if path:
                sections[node.targets[0].id] = path
    return {".".join(path) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            for path in [_key_path(_attribute_chain(node), sections)] if path}


def test_the_key_reader_needs_the_full_path():
    tree = ast.parse("m = cfg.MODEL\nx = m.F_THRES\ny = run.cfg.TRAIN.MULTI_SCALE\nz = stage.NUM_BRANCHES\n")
    keys = read_config_keys(tree)
    assert {"MODEL.F_THRES", "TRAIN.MULTI_SCALE"} <= keys
    assert "TEST.MULTI_SCALE" not in keys and "MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES" not in keys


def test_no_default_is_dead():
    """Every default is read, by its full path, outside the config package (``cfg.TEST.MULTI_SCALE``
    does not count for ``TRAIN.MULTI_SCALE``), or pinned by a one-value choice (the original's
    architecture keys, which say what this implementation builds)."""
    files = [p for d in ("lib", "tools", "pretrained_models") for p in (REPO / d).rglob("*.py")
             if "config" not in p.relative_to(REPO).parts]
    read = set().union(*(read_config_keys(ast.parse(p.read_text(), filename=str(p))) for p in files))
    dead = [k for k in sorted(_default_keys()) if k not in read and len(CHOICES.get(k, ())) != 1]
    assert dead == []
    assert not set(IGNORED) & _default_keys() and not set(RENAMED) & _default_keys()


def test_the_originals_second_names_are_applied_to_the_key_that_owns_the_fact(tmp_path, caplog):
    """AUTO_RESUME is TRAIN.RESUME, DATASET.NUM_CLASSES is MODEL.NUM_CLASSES: applied there, named in the
    warning; a file that gives one setting two different values under both names is an error."""
    path = tmp_path / "original.yaml"
    digits = Path(DIGITS).read_text().replace("  RESUME: false\n", "")
    path.write_text(digits.replace("DATASET:\n", "AUTO_RESUME: true\nDATASET:\n  NUM_CLASSES: 10\n"))
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path)
    assert cfg.TRAIN.RESUME is True and cfg.MODEL.NUM_CLASSES == 10
    assert "AUTO_RESUME" not in cfg and "NUM_CLASSES" not in cfg.DATASET
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "AUTO_RESUME (applied as TRAIN.RESUME)" in warnings[0]
    assert "DATASET.NUM_CLASSES (applied as MODEL.NUM_CLASSES)" in warnings[0]
    assert load_config(DIGITS, ["DATASET.NUM_CLASSES", "7"]).MODEL.NUM_CLASSES == 7
    path.write_text(digits.replace("DATASET:\n", "DATASET:\n  NUM_CLASSES: 19\n"))
    with pytest.raises(ConfigError, match=r"DATASET\.NUM_CLASSES = 19 and MODEL\.NUM_CLASSES = 10 name one setting"):
        load_config(path)
    path.write_text(Path(DIGITS).read_text() + "AUTO_RESUME: true\n")   # the file says RESUME: false
    with pytest.raises(ConfigError, match=r"AUTO_RESUME = True and TRAIN\.RESUME = False name one setting"):
        load_config(path)


def test_a_split_is_named_the_same_way_for_every_dataset():
    """DATASET.TRAIN_SET / TEST_SET name a split; the dataset says where it lies; a path stays a path."""
    assert split_path("val", "{}") == "val" and split_path("valid", "{}") == "val"
    assert split_path("test", LIST_PATTERN) == "list/cityscapes/test.lst"
    assert split_path("list/cityscapes/val.lst", LIST_PATTERN) == "list/cityscapes/val.lst"
    assert split_path("mine.lst", LIST_PATTERN) == "mine.lst"


def test_the_originals_unused_keys_load_with_one_warning_naming_them_all(tmp_path, caplog):
    path = tmp_path / "original.yaml"
    path.write_text(Path(DIGITS).read_text() + "GPUS: (0,1,2,3)\nDEBUG:\n  DEBUG: false\n"
                    "  SAVE_HEATMAPS_GT: true\n")
    with caplog.at_level(logging.WARNING):
        cfg = load_config(path, ["TEST.NMS_THRE", "0.3", "DATASET.FLIP", "False"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    for key in ("GPUS", "DEBUG.DEBUG", "DEBUG.SAVE_HEATMAPS_GT", "TEST.NMS_THRE", "DATASET.FLIP (use TRAIN.FLIP)"):
        assert key in warnings[0]
    assert "GPUS" not in cfg and "DEBUG" not in cfg and cfg.TRAIN.FLIP is True
    # a key neither the original nor we know stays an error, with a spelling hint
    with pytest.raises(ConfigError, match=r"unknown config key TEST\.NMS_THREE = 0\.3"):
        load_config(DIGITS, ["TEST.NMS_THREE", "0.3"])
    path.write_text(Path(DIGITS).read_text() + "DEBUG:\n  DEBUGG: true\n")
    with pytest.raises(ConfigError, match="unknown config key DEBUG"):
        load_config(path)


# ------------------------------------------------------------------------------ not a checkpoint
@pytest.mark.parametrize("name,needle", [
    ("notes.txt", "is not a checkpoint"), ("config.yaml", "is not a checkpoint"),
    ("results.json", "is not a checkpoint"), ("picture.png", "is not a checkpoint"),
    ("empty.pth", "is not a checkpoint (the file is empty"), ("a_run", "is a folder, not a checkpoint file"),
])
def test_a_file_that_is_not_a_checkpoint_says_so(junk, name, needle):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(junk / name)
    msg = str(err.value)
    assert needle in msg and str(junk / name) in msg
    assert "weights_only=False" not in msg and "unpickling" not in msg
    assert load_checkpoint(junk / "weights.pth")["epoch"] == 3


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_code_carrying_pickle_is_still_refused(evil_pickle):
    bad, marker = evil_pickle
    with pytest.raises(CheckpointError, match="refused to load .*arbitrary unpickling"):
        load_checkpoint(bad)
    assert not marker.exists()


@pytest.mark.parametrize("name,needle", [("notes.txt", "not a checkpoint"), ("picture.png", "not a checkpoint"),
                                         ("a_run", "is a folder, not a checkpoint file")])
@pytest.mark.slow
def test_testModel_that_is_not_a_checkpoint_is_one_line(junk, tmp_path, name, needle):
    proc = run_process([sys.executable, "tools/cls_valid.py", "--cfg", DIGITS, "--modelDir", tmp_path / "o",
                        "--logDir", tmp_path / "l", "--testModel", junk / name], expect=None)
    one_error_line(proc, "CheckpointError", str(junk / name), needle)


# ----------------------------------------------------------------------------- the solver tools
@pytest.mark.parametrize("tool,option,name,needle", [
    ("tools/benchmark.py", "--images", "picture.png", "not a checkpoint"),
    ("tools/benchmark.py", "--testModel", "notes.txt", "not a checkpoint"),
    ("tools/plot_convergence.py", "--images", "weights.pth", "expected a (N, 3, H, W) image tensor"),
    ("tools/plot_convergence.py", "--testModel", "a_run", "is a folder"),
])
@pytest.mark.slow
def test_solver_tools_bad_inputs_are_one_line(junk, tmp_path, tool, option, name, needle):
    extra = ["--out-dir", tmp_path / "conv"] if "plot" in tool else ["--mem-thres", "", "--repeats", "1"]
    proc = run_process([sys.executable, tool, "--cfg", DIGITS, option, junk / name, "--batch-size", "2", *extra],
                       expect=None)
    one_error_line(proc, str(junk / name), needle)


@pytest.mark.parametrize("tool,args,needle", [
    ("benchmark", ["--batch-size", "-4"], "argument --batch-size: -4 is out of range: must be >= 1"),
    ("benchmark", ["--solvers", "broyden,nosuch"], "argument --solvers: 'nosuch': choose from broyden, anderson"),
    ("benchmark", ["--repeats", "0"], "argument --repeats: 0 is out of range: must be >= 1"),
    ("benchmark", ["--image-size", "many"], "argument --image-size: 'many' is not a whole number"),
    ("plot_convergence", ["--batch-size", "-2"], "argument --batch-size: -2 is out of range: must be >= 1"),
    ("plot_convergence", ["--solvers", "nosuch"], "argument --solvers: 'nosuch': choose from"),
    ("plot_convergence", ["--evals", "0"], "argument --evals: 0 is out of range: must be >= 1"),
    ("compare_training_cost", ["--seeds", "abc"], "argument --seeds: 'abc' in 'abc' is not a whole number >= 0"),
    ("compare_training_cost", ["--seeds", ","], "argument --seeds: ',' names no number"),
])
def test_tool_arguments_are_checked_by_the_parser_in_one_line(tool, args, needle, tmp_path, capsys):
    """The tools' own options (in-process: the parser exits before any work); nothing is written."""
    import runpy
    main = runpy.run_path(str(REPO / "tools" / f"{tool}.py"))["main"]
    where = ["--out", str(tmp_path / "out")] if tool == "compare_training_cost" else ["--cfg", DIGITS]
    where += ["--out-dir", str(tmp_path / "out")] if tool == "plot_convergence" else []
    where += ["--json", str(tmp_path / "out" / "b.json")] if tool == "benchmark" else []
    with pytest.raises(SystemExit) as exit_:
        main([*where, *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert exit_.value.code == 2 and len(errors) == 1 and f"error: {needle}" in errors[0], err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_an_image_size_too_small_for_the_model_is_one_line_before_any_output(tmp_path):
    """--image-size 3 for the digits model (two halvings before its coarsest stream) in both solver tools."""
    for tool, extra in (("tools/benchmark.py", ["--json", tmp_path / "out" / "b.json", "--repeats", "1"]),
                        ("tools/plot_convergence.py", ["--out-dir", tmp_path / "out"])):
        proc = run_process([sys.executable, tool, "--cfg", DIGITS, "--image-size", "3", "--batch-size", "2", *extra],
                           expect=None)
        one_error_line(proc, "ConfigError", "--image-size 3 is too small for this model", "at least 8 pixels")
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_converter_bad_input_is_one_line(junk, tmp_path):
    proc = run_process([sys.executable, "pretrained_models/convert_cls_to_seg.py", junk / "results.json",
                        tmp_path / "o.pth"], expect=None)
    one_error_line(proc, "CheckpointError", str(junk / "results.json"), "not a checkpoint")
    proc = run_process([sys.executable, "pretrained_models/convert_cls_to_seg.py", junk / "weights.pth",
                        tmp_path / "o.pth"], expect=None)
    one_error_line(proc, "CheckpointError", "no equilibrium stage")
    assert not (tmp_path / "o.pth").exists()
    # a classification checkpoint of another width than the segmentation config: the report lists it
    from mdeq.models import get_cls_net
    save_checkpoint(get_cls_net(load_config(DIGITS)).state_dict(), tmp_path / "digits.pth")
    proc = run_process([sys.executable, "pretrained_models/convert_cls_to_seg.py", tmp_path / "digits.pth",
                        tmp_path / "o.pth", "--cfg", SEG_CFG], expect=None)
    one_error_line(proc, "CheckpointError", "does not fit the segmentation net of", SEG_CFG)
    assert "missing in the checkpoint" in proc.all and "shape mismatches" in proc.all
    assert not (tmp_path / "o.pth").exists()


#: optional dependencies: imported only inside the one function that needs them, which names the install in a
#: one-line error where they are missing (tests/test_peer_comparison.py checks that error)
OPTIONAL_IMPORTS = {"torchdeq": "tools/compare_torchdeq.py, the peer comparison (mdeq.analysis.peer_comparison)"}


def test_plot_convergence_needs_only_the_readme_install():
    """Every third-party module that lib/, tools/ and pretrained_models/ import is in requirements.txt
    (the README's "Install") and in setup.py, but the :data:`OPTIONAL_IMPORTS`."""
    dist = {"PIL": "pillow", "cv2": "opencv-python-headless", "sklearn": "scikit-learn", "yaml": "pyyaml",
            "tensorboardX": "tensorboardx"}
    imported = set()
    for d in ("lib", "tools", "pretrained_models"):
        for p in (REPO / d).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                imported |= {n.split(".")[0] for n in names}
    third_party = {dist.get(m, m).lower() for m in imported
                   if m not in sys.stdlib_module_names and m != "mdeq" and m not in OPTIONAL_IMPORTS}
    assert "matplotlib" in third_party
    reqs = {re.split(r"[<>=\s#\[]", line.strip())[0].lower()
            for line in (REPO / "requirements.txt").read_text().splitlines() if line.strip() and line[0] != "#"}
    setup = {s.lower() for s in re.findall(r"\"([A-Za-z][\w.-]*)[<>=]*[\d.]*\"", (REPO / "setup.py").read_text())}
    assert third_party - reqs == set()
    assert third_party - setup == set()


# ----------------------------------------------------------------------------------------- disk full
def test_disk_full_while_writing_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, caplog):
    out = tmp_path / "run"
    path = out / "checkpoint.pth.tar"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert err.value.errno == errno.ENOSPC
    with caplog.at_level(logging.ERROR):
        status = run_tool(lambda argv: save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path))
    monkeypatch.undo()
    assert status == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "Traceback" not in caplog.text
    for needle in ("CheckpointWriteError", str(out), "No space left on device",
                   "previous checkpoint.pth.tar is intact"):
        assert needle in errors[0], errors[0]
    assert sorted(os.listdir(out)) == ["checkpoint.pth.tar"]  # the partial file is gone
    assert load_checkpoint(path)["epoch"] == 1


# the real training tool with torch.save failing as on a full disk from the second epoch's checkpoint on
_FULL_DISK = """import errno, os, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 2:
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(obj, f, *args, **kwargs)
torch.save = save
"""


@pytest.mark.slow
def test_disk_full_during_training_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    opts = ["--modelDir", tmp_path / "o", "--logDir", tmp_path / "l", "PERCENT", "0.06", "TRAIN.BATCH_SIZE_PER_GPU",
            "16", "TRAIN.END_EPOCH", "2", "TRAIN.PRETRAIN_STEPS", "4", "MODEL.F_THRES", "4", "MODEL.B_THRES", "4",
            "TEST.BATCH_SIZE_PER_GPU", "150"]
    proc = run_process([sys.executable, *patched_tool("cls_train.py", _FULL_DISK), "--cfg", DIGITS, *opts],
                       expect=None)
    out = tmp_path / "o" / "digits" / "cls_mdeq_digits"
    one_error_line(proc, "CheckpointWriteError", str(out), "No space left on device", "is intact")
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]
    assert load_checkpoint(out / "checkpoint.pth.tar")["epoch"] == 1


# ------------------------------------------------------------------------------------ label images
@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    return build_cityscapes_tree(tmp_path_factory.mktemp("city"))


def _bad_label_list(city: Path, name: str, label: np.ndarray) -> str:
    """A list file of one training image whose label is ``label``; returns the list's path under ROOT."""
    img = "leftImg8bit/train/aachen/aachen_000000_000000_leftImg8bit.png"
    lab = f"gtFine/train/aachen/{name}_gtFine_labelIds.png"
    assert cv2.imwrite(str(city / "cityscapes" / lab), label)
    (city / "list" / "cityscapes" / f"{name}.lst").write_text(f"{img} {lab}\n")
    return f"list/cityscapes/{name}.lst"


def test_label_images_are_checked_for_dtype_and_range(city):
    """When the dataset is built (its first label) and whenever a label is read."""
    shape = cv2.imread(str(city / "cityscapes/leftImg8bit/train/aachen/aachen_000000_000000_leftImg8bit.png")).shape[:2]
    wide = np.full(shape, 7, np.uint16)
    wide[3, 5] = 2301
    trainids = np.full(shape, 255, np.uint8)  # a *_labelTrainIds.png by mistake
    for name, label, needles in (("wide", wide, ("uint16", "2301")), ("trainids", trainids, ("value 255", "0..33"))):
        lst = _bad_label_list(city, name, label)
        with pytest.raises(CityscapesError) as err:
            CityscapesDataset(str(city), lst, train=True, crop_size=(32, 64), base_size=128)
        assert f"{name}_gtFine_labelIds.png" in str(err.value) and all(n in str(err.value) for n in needles)
        good = (city / "list" / "cityscapes" / "train.lst").read_text().splitlines()[0]
        (city / lst).write_text(f"{good}\n{(city / lst).read_text()}")   # the bad label second: found when read
        ds = CityscapesDataset(str(city), lst, train=True, crop_size=(32, 64), base_size=128)
        with pytest.raises(CityscapesError, match=f"{name}_gtFine_labelIds.png"):
            ds[1]


@pytest.mark.slow
def test_a_classification_config_given_to_the_segmentation_tools_is_one_line(tmp_path):
    for tool in ("tools/seg_train.py", "tools/seg_test.py"):
        proc = run_process([sys.executable, tool, "--cfg", DIGITS, "--modelDir", tmp_path / "o", "--logDir",
                            tmp_path / "l", "--testModel", tmp_path / "none.pth"], expect=None)
        one_error_line(proc, "ConfigError", "segmentation trains and tests on Cityscapes", "'digits'",
                        "tools/cls_train.py")
    proc = run_process([sys.executable, "tools/seg_train.py", "--cfg", SEG_CFG, "--modelDir", tmp_path / "o",
                        "--logDir", tmp_path / "l", "DATASET.NUM_CLASSES", "1000"], expect=None)
    one_error_line(proc, "ConfigError", "Cityscapes has 19 train classes; MODEL.NUM_CLASSES is 1000")


@pytest.mark.slow
def test_16_bit_label_in_a_training_list_is_one_line(city, tmp_path):
    shape = (64, 128)
    wide = np.full(shape, 7, np.uint16)
    wide[0, 0] = 2301
    lst = _bad_label_list(city, "wide16", wide)
    proc = run_process([sys.executable, "tools/seg_train.py", "--cfg", SEG_CFG, "--modelDir", tmp_path / "o",
                        "--logDir", tmp_path / "l", "DATASET.ROOT", city, "DATASET.TRAIN_SET", lst,
                        "DATASET.TEST_SET", "", "WORKERS", "0", "TRAIN.BATCH_SIZE_PER_GPU", "1",
                        "TRAIN.IMAGE_SIZE", "[64, 32]", "TRAIN.BASE_SIZE", "128"], expect=None)
    one_error_line(proc, "CityscapesError", "wide16_gtFine_labelIds.png", "2301")
