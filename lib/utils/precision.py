"""TRAIN.AMP's half-precision type for a device.

On a GPU, autocast runs in bfloat16 where the card has it (float32's exponent range: no loss
scaling) and in float16 elsewhere. On a CPU, bfloat16 pays only where the CPU computes it in
hardware (AVX512-BF16 or AMX tiles: oneDNN's bfloat16 convolutions are then several times faster
than float32 ones); elsewhere it is emulated and slower, so TRAIN.AMP falls back to float32
(docs/performance.md has the figures).
"""
from __future__ import annotations

from typing import Optional

import torch

from .provenance import cpu_bf16_features


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX tiles)."""
    return bool(cpu_bf16_features())


def autocast_dtype(enabled: bool, device: torch.device) -> Optional[torch.dtype]:
    """TRAIN.AMP's autocast dtype on ``device``: bfloat16 where the GPU has it, else float16; on a
    CPU bfloat16 where :func:`cpu_has_native_bf16`; None when off or not available (float32)."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None
