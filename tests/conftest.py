"""Shared fixtures: paths to the repository and to the original implementation's reference files."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Tuple

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


@pytest.fixture(scope="session", autouse=True)
def _cpu_allocator():
    from mdeq.utils.cpu_allocator import retain_freed_memory
    retain_freed_memory()       # as the tools do: fewer page faults, a faster suite
    yield


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def reference() -> Path:
    if not (REFERENCE / "cifar_tiny.pkl").is_file():
        pytest.skip(f"reference files not found at {REFERENCE}")
    return REFERENCE


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
