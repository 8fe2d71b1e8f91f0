"""The reversible backward (MODEL.GRAD reversible) measured: its gradient against autograd through the
same coupled steps stored in full, the reconstruction drift of its rebuilt states, and the peak memory
of a training step against the stored steps and the unrolled stack (``tools/benchmark.py --parts
reversible``)."""
from __future__ import annotations

import logging
import multiprocessing
from dataclasses import replace
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...modules import coupled_steps, weights_fixed
from ...utils.cpu_allocator import retain_freed_memory
from .memory import _peak_start, _peak_total
from .spec import BenchSpec, build

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

#: what the accuracy table runs: dtypes, betas and numbers of coupled steps
REV_DTYPES = ("float64", "float32")
REV_BETAS = (0.5, 0.8, 1.2)
REV_STEPS = (2, 4, 8, 16, 32)
#: the memory table's numbers of coupled steps, and the ways of backpropagating through them
REV_MEM_STEPS = (4, 32)
REV_MEM_MODES = ("reversible", "stored", "unrolled")


def _reversible_spec(spec: BenchSpec, beta: float) -> BenchSpec:
    """``spec`` with the reversible solver and backward at ``beta``, every step run (tolerance 0)."""
    return replace(spec, opts=list(spec.opts) + ["MODEL.F_SOLVER", "reversible", "MODEL.GRAD", "reversible",
                                                 "MODEL.REV_BETA", beta, "MODEL.F_EPS", 0.0])


def _stored_logits(model, x: Tensor, steps: int, beta: float) -> Tensor:
    """The model's logits with its equilibrium replaced by ``steps`` coupled steps recorded by autograd."""
    with weights_fixed(model.fullstage):
        problem = model.equilibrium_problem(model.injection(x))
        z = coupled_steps(problem.f, problem.z0, steps, beta)
    return model.head(problem.unflatten(z))


def _flat_grads(loss: Tensor, tensors: Sequence[Tensor]) -> Tensor:
    """d loss / d tensors, flattened and concatenated (zeros where a tensor gets none)."""
    grads = torch.autograd.grad(loss, list(tensors), allow_unused=True)
    return torch.cat([(torch.zeros_like(t) if g is None else g).flatten() for t, g in zip(tensors, grads)])


def gradient_drift(model, x: Tensor, y: Tensor, steps: int, beta: float) -> Dict[str, float]:
    """One batch: the relative error of the reversible gradient of every parameter and of the input
    images (through the injection) against that of the same steps stored by autograd, the backward's
    reconstruction error and the forward's final residual. ``model`` has the reversible solver at ``beta``."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    xr, xs = x.detach().requires_grad_(True), x.detach().requires_grad_(True)
    logits, info = model(xr, return_info=True, f_thres=steps)
    g_rev = _flat_grads(F.cross_entropy(logits, y), params + [xr])
    g_ref = _flat_grads(F.cross_entropy(_stored_logits(model, xs, steps, beta), y), params + [xs])
    return {"grad_rel_error": float((g_rev - g_ref).double().norm() / g_ref.double().norm()),
            "rev_error": float(info.b_rev_error), "f_rel": float(info.f_rel)}
