"""Shared fixtures: paths to the repository and to the original implementation's reference files
(``tests/data/reference``, see its README), and the device the device-independent tests run on.

``pytest --device cuda`` runs the tests that take the ``device`` fixture (reference, gradient,
layout, AMP, DDP and compile tests) on the GPU and skips the others, which do not depend on the
device; without a GPU every one of them is skipped with the reason. The default is the CPU, on
which every test runs as it always did. ``--run-compile`` also runs the tests marked
``compile`` (``torch.compile`` takes minutes on a small CPU).
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Tuple

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
