"""Shared fixtures: paths to the repository and to the original implementation's reference files
(``tests/data/reference``, see its README), and the device the device-independent tests run on.

``pytest --device cuda`` runs the tests that take the ``device`` fixture (reference, gradient,
layout, AMP, DDP and compile tests) on the GPU and skips the others, which do not depend on the
device; without a GPU every one of them is skipped with the reason. The default is the CPU, on
which every test runs as it always did. ``--run-compile`` also runs the tests marked
``compile`` (``torch.compile`` takes minutes on a small CPU). Tests marked ``slow`` (a tool run in
subprocesses, over about 5 s each) run by default, as in CI; ``-m "not slow"`` leaves them out.

Helpers that several test files use live here, imported as ``from conftest import ...``:
:func:`run_process` and :data:`TOOL_ENV` (running a tool as a user does), :func:`patched_tool`,
:func:`one_error_line` (a tool's failure as a user sees it),
:func:`build_cityscapes_tree` with :data:`SEG_CFG` / :data:`SEG_TINY` (a small Cityscapes tree and
a segmentation model that trains on it in seconds).
"""
from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _find_reference() -> Path:
    """$MDEQ_REFERENCE if set, else the recordings that ship with the repository (tests/data/reference)."""
    env = os.environ.get("MDEQ_REFERENCE")
    return Path(env) if env else REPO / "tests" / "data" / "reference"


REFERENCE = _find_reference()


def pytest_addoption(parser) -> None:
    parser.addoption("--device", default="cpu", choices=("cpu", "cuda"),
                     help="run the device-independent tests on this device (default cpu)")
    parser.addoption("--run-compile", action="store_true", default=False,
                     help="also run the tests marked 'compile' (torch.compile; slow on a small CPU)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "compile: compiles the model with torch.compile (needs --run-compile)")
    config.addinivalue_line("markers", "slow: runs tools in subprocesses for more than about 5 s (deselect with "
                                       "-m 'not slow'; CI runs them)")


def pytest_collection_modifyitems(config, items) -> None:
    on_cuda = config.getoption("--device") == "cuda"
    run_compile = config.getoption("--run-compile")
    cpu_only = pytest.mark.skip(reason="--device cuda: this test does not depend on the device (no 'device' fixture)")
    no_compile = pytest.mark.skip(reason="torch.compile test: pass --run-compile to run it")
    for item in items:
        if on_cuda and "device" not in getattr(item, "fixturenames", ()):
            item.add_marker(cpu_only)
        if "compile" in item.keywords and not run_compile:
            item.add_marker(no_compile)


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device of the device-independent tests (``--device``). On CUDA, TF32 is switched off so
    that float32 tolerances mean float32 (cuDNN convolutions use TF32 by default)."""
    name = request.config.getoption("--device")
    if name == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("--device cuda: no CUDA GPU is visible (torch.cuda.is_available() is False)")
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    return torch.device(name)


@pytest.fixture(scope="session", autouse=True)
def _cpu_allocator():
    from mdeq.utils.cpu_allocator import retain_freed_memory
    retain_freed_memory()       # as the tools do: fewer page faults, a faster suite
    yield


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from torch's global generator seeded with 0 (the number of threads is left to
    OMP_NUM_THREADS / torch's default)."""
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def reference() -> Path:
    """The folder of the original implementation's recordings (tests/data/reference, or $MDEQ_REFERENCE)."""
    if not (REFERENCE / "cifar_tiny.pkl").is_file():   # they ship with the repository: their absence is a failure
        pytest.fail(f"reference files not found at {REFERENCE} (tests/data/reference, or $MDEQ_REFERENCE)")
    return REFERENCE


def patched_tool(tool: str, patch: str) -> list:
    """The arguments after ``python`` that run ``tools/<tool>`` as a user does (``__main__``, from the
    repository root) after the Python code ``patch`` ran: how a test plants a failure (a full disk, a
    signal at a chosen moment) in a real run without a test hook in the library."""
    script = (f"{patch}\nimport runpy, sys\nsys.argv = ['tools/{tool}'] + sys.argv[1:]\n"
              f"runpy.run_path('tools/{tool}', run_name='__main__')\n")
    return ["-c", script]


def one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2, exactly one ``error:`` line, holding every needle; no traceback anywhere."""
    text = proc.all  # type: ignore[attr-defined]
    assert proc.returncode == 2, f"exit status {proc.returncode}:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if "error:" in line]
    assert len(errors) == 1, text[-3000:]
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0]


#: the environment of the tools a test starts: one thread, unbuffered output, and no GPU (the
#: multi-process tests start more ranks than one GPU holds)
TOOL_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")


def run_process(cmd: Sequence[Any], expect: Optional[int] = 0, cwd: Path = REPO, timeout: float = 240,
                env: Optional[Mapping[str, str]] = None, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` (its items as strings) from ``cwd`` as a user runs a tool, in its own process group,
    which is killed whole on a timeout (launchers leave their workers behind), then fail the test.

    Args:
        expect: the exit status the test needs (a failure shows the output's tail); ``None``: any.
        env: the environment (default :data:`TOOL_ENV`), plus ``extra_env``.

    Returns:
        the finished process; ``proc.all`` is stdout then stderr, ``proc.seconds`` its wall time.
    """
    t0 = time.time()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env={**(env or TOOL_ENV), **extra_env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))} timed out after {timeout}s:\n{out[-4000:]}\n{err[-4000:]}")
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    done.all, done.seconds = out + err, time.time() - t0  # type: ignore[attr-defined]
    if expect is not None and done.returncode != expect:
        raise AssertionError(f"{' '.join(map(str, cmd))}: exit status {done.returncode}, expected {expect}:\n"
                             f"{out[-5000:]}\n{err[-5000:]}")
    return done


# ---------------------------------------------------------------------- a small Cityscapes tree
SEG_CFG = "experiments/cityscapes/seg_mdeq_SMALL.yaml"
#: overrides that make SEG_CFG's model train on :func:`build_cityscapes_tree` in seconds
SEG_TINY = ["MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8,16,16,16]", "MODEL.NUM_GROUPS", "4",
            "TRAIN.IMAGE_SIZE", "[64,32]", "TRAIN.BASE_SIZE", "128", "TRAIN.BATCH_SIZE_PER_GPU", "2",
            "MODEL.F_THRES", "6", "MODEL.B_THRES", "6", "WORKERS", "0", "PRINT_FREQ", "1",
            "TEST.BATCH_SIZE_PER_GPU", "2"]
CITY_TILE_W, CITY_TILE_H = 128, 64
#: split -> (city, images) of the tree
CITY_SPLITS = {"train": ("aachen", 8), "val": ("frankfurt", 4), "test": ("berlin", 2)}


def _tiles():
    from sklearn.datasets import load_sample_images
    for photo in load_sample_images().images:  # (427, 640, 3) RGB
        for y in range(0, photo.shape[0] - CITY_TILE_H + 1, CITY_TILE_H):
            for x in range(0, photo.shape[1] - CITY_TILE_W + 1, CITY_TILE_W):
                yield photo[y:y + CITY_TILE_H, x:x + CITY_TILE_W]


def _label_ids(tile: np.ndarray) -> np.ndarray:
    """Label ids 0..33 from the quantised brightness, a band with every id, and a block of road."""
    gray = tile.astype(np.float32).mean(axis=2)
    ids = np.minimum((gray / 256.0 * 34).astype(np.int64), 33)
    ids[:2, :] = np.arange(tile.shape[1])[None, :] % 34  # every id, ignored ones included
    ids[-8:, :16] = 7  # road
    return ids.astype(np.uint8)


def build_cityscapes_tree(root: Path) -> Path:
    """A Cityscapes-format tree under ``root`` (returned): tiles (128x64) of scikit-learn's two sample
    photographs as ``cityscapes/leftImg8bit/<split>/<city>/..._leftImg8bit.png``, label-id images
    ``gtFine/.../..._gtFine_labelIds.png`` (ids from the quantised brightness plus a band holding every
    id 0..33), and ``list/cityscapes/{train,val,test}.lst`` (:data:`CITY_SPLITS`; test without labels)."""
    base = root / "cityscapes"
    (root / "list" / "cityscapes").mkdir(parents=True)
    tiles = _tiles()
    for split, (city, count) in CITY_SPLITS.items():
        lines = []
        for i in range(count):
            tile = next(tiles)
            stem = f"{city}_000000_{i:06d}"
            img_rel = f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"
            lab_rel = f"gtFine/{split}/{city}/{stem}_gtFine_labelIds.png"
            (base / img_rel).parent.mkdir(parents=True, exist_ok=True)
            (base / lab_rel).parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(base / img_rel), cv2.cvtColor(tile, cv2.COLOR_RGB2BGR))
            assert cv2.imwrite(str(base / lab_rel), _label_ids(tile))
            lines.append(img_rel if split == "test" else f"{img_rel} {lab_rel}")
        (root / "list" / "cityscapes" / f"{split}.lst").write_text("\n".join(lines) + "\n")
    return root


class _Payload:
    """Unpickling this runs a shell command: what a malicious '.pkl' downloaded from the internet does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_pickle(tmp_path) -> Tuple[Path, Path]:
    """(a checkpoint-looking pickle whose loading would create ``marker``, marker)."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pkl"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Payload(marker)}, f)
    return evil, marker
