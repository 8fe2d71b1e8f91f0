"""Shared fixtures: paths to the repository and to the original implementation's reference files."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"


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
