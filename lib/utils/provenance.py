"""Where a run ran: the code's commit, the CPU and its bfloat16 hardware, threads and torch.

``results.json`` records these beside the run's figures (:func:`run_provenance`), so that a figure
can be read with the machine and the code that produced it; ``tools/model_zoo.py`` shows them in
the model tables.
"""
from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

#: the repository this package is installed from (``pip install -e .``): ``lib/`` is the package
REPO = Path(__file__).resolve().parents[2]
#: bfloat16 hardware as results.json names it, and torch's probe for it
BF16_FEATURES = (("AVX512-BF16", "_is_avx512_bf16_supported"), ("AMX", "_is_amx_tile_supported"))


def git_commit(repo: Optional[Path] = None) -> str:
    """The short hash of ``repo``'s checked-out commit (default: this package's repository), with
    ``-dirty`` when tracked files differ from it; ``"unknown"`` outside a git checkout."""
    cwd = str(repo or REPO)
    try:
        head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], cwd=cwd, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                                 capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("no git commit for %s: %s", cwd, e)
        return "unknown"
    return f"{head}-dirty" if changed else head


def cpu_model() -> str:
    """This machine's CPU as ``/proc/cpuinfo`` names it (``model name``), or ``""`` where it cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


def cpu_bf16_features() -> List[str]:
    """The bfloat16 hardware of this CPU that torch detects: ``"AVX512-BF16"``, ``"AMX"``, both or none."""
    return [name for name, probe in BF16_FEATURES if bool(getattr(torch.cpu, probe, lambda: False)())]


def run_provenance() -> Dict[str, Any]:
    """The keys results.json records about the run's code and machine: ``commit``, ``cpu_model``,
    ``cpu_bf16`` (a list, empty without bfloat16 hardware), ``threads`` and ``torch``."""
    return {"commit": git_commit(), "cpu_model": cpu_model(), "cpu_bf16": cpu_bf16_features(),
            "threads": torch.get_num_threads(), "torch": torch.__version__.split("+")[0]}
