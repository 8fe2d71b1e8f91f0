"""What a model costs, for any MODEL.NAME (the MDEQ and its baselines side by side,
``tools/model_cost.py``): parameters, FLOPs, the peak memory and time of a training step at the
config's batch size, and inference images per second at a fixed batch.

Each config is measured in a fresh (spawned) process on the CPU, so that the peak resident set
sizes are comparable, with the allocator set as the training tools set it. The batch is the
config's first training batch (its data pipeline, augmentation included). A training step is the
engine's, in the layout the training runs in (TRAIN.CHANNELS_LAST, :mod:`mdeq.models.layout`): the
model's call at the first step after the warm-up (``train_step`` = TRAIN.PRETRAIN_STEPS),
cross-entropy, backward and the configured optimizer's update; an MDEQ runs
its whole forward and backward budgets (tolerance 0, the most a step can cost; at the tolerances
of the Fashion-MNIST configs the solvers run their whole budgets anyway). Inference is an
evaluation-mode forward pass without autograd, the MDEQ again at tolerance 0, of the copy that the
evaluation tools run (:func:`mdeq.models.inference.evaluation_model`: BatchNorm folded, channels-last
layers, as TEST.FOLD_BN and TEST.CHANNELS_LAST say).
"""
from __future__ import annotations

import logging
import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from ...config import load_config
from ...datasets import build_cls_datasets
from ...models import count_parameters, forward_kind, get_cls_net
from ...models.flops import f_flops, forward_flops
from ...models.inference import evaluation_model
from ...models.layout import training_layout
from ...utils.cpu_allocator import retain_freed_memory
from ...utils.optim import build_optimizer
from ...utils.precision import autocast_dtype
from .memory import _peak_start, _peak_total
from .timing import median_time

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


@dataclass
class CostSpec:
    """One config to measure (picklable, for the worker process)."""

    cfg: str
    opts: List[Any] = field(default_factory=list)
    threads: int = 1
    infer_batch: int = 500
    repeats: int = 3


def first_batch(cfg, batch: int) -> Tuple[Tensor, Tensor]:
    """The first ``batch`` images (N, C, H, W) and labels (N,) of ``cfg``'s training set, as its
    pipeline gives them (augmentation included), repeated if the set is smaller."""
    train_set, _ = build_cls_datasets(cfg)
    torch.manual_seed(cfg.SEED)
    pairs = [train_set[i % len(train_set)] for i in range(batch)]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])


def _call(kind: str) -> Dict[str, Any]:
    """The measured calls' keywords: an equilibrium model at tolerance 0 (its whole budgets)."""
    return {"eps": 0.0} if kind == "equilibrium" else {}


def _f_calls(model, x: Tensor, kind: str) -> Any:
    """Evaluations of f in one evaluation-mode forward pass of ``x`` (None: the model has no f)."""
    if kind == "explicit":
        return None
    calls = [0]
    hook = model.fullstage.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model.eval()
    try:
        with torch.no_grad():
            model(x, **_call(kind))
    finally:
        hook.remove()
    return calls[0]


def _autocast(dtype: Any) -> Any:
    """The training's autocast (TRAIN.AMP; ``dtype`` None: float32) on the CPU."""
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def _train_step_cost(model, cfg, x: Tensor, y: Tensor, repeats: int, amp: Any = None) -> Dict[str, float]:
    """Peak RSS (MiB) of the first training step (its growth over the RSS before it, after a no-grad
    call; and the process's peak) and the median time (s) of the steps after it; under autocast to
    ``amp`` when it is a dtype."""
    optimizer = build_optimizer(cfg, model)
    call = dict(_call(forward_kind(model)), train_step=int(cfg.TRAIN.PRETRAIN_STEPS), return_info=True)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with _autocast(amp):
            logits, _ = model(x, **call)
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        optimizer.step()

    with torch.no_grad(), _autocast(amp):   # kernels and thread pools exist before the measure, as in peak_memory_worker
        model(x[:2], **call)
    before = _peak_start(x.device)
    step()                          # the first step: what it allocates (the optimizer's state too) is its peak
    total = _peak_total(x.device)
    t = median_time(step, repeats, x.device, warmup=0)
    return {"step_peak_mib": (total - before) / 2 ** 20, "process_peak_mib": total / 2 ** 20, "train_step_s": t}


def _inference_rate(model, x: Tensor, repeats: int, amp: Any = None) -> float:
    """Images per second of an evaluation-mode forward pass of the batch ``x`` (no autograd), under
    autocast to ``amp`` when it is a dtype."""
    model.eval()
    call = _call(forward_kind(model))
    with torch.no_grad(), _autocast(amp):
        t = median_time(lambda: model(x, **call), repeats, x.device, warmup=1)
    return x.shape[0] / t


def model_cost_worker(spec: CostSpec) -> Dict[str, Any]:
    """Every figure of one config (see the module docstring); run it in a fresh process."""
    retain_freed_memory()
    torch.set_num_threads(spec.threads)
    cfg = load_config(spec.cfg, list(spec.opts))
    torch.manual_seed(cfg.SEED)
    model = get_cls_net(cfg)
    kind = forward_kind(model)
    size = list(cfg.MODEL.IMAGE_SIZE)
    x, y = first_batch(cfg, int(cfg.TRAIN.BATCH_SIZE_PER_GPU))
    amp = autocast_dtype(bool(cfg.TRAIN.AMP), torch.device("cpu"))
    out: Dict[str, Any] = {"cfg": spec.cfg, "model": cfg.MODEL.NAME, "forward": kind,
                           "dtype": str(amp or torch.float32).replace("torch.", ""),
                           "parameters": count_parameters(model), "batch": int(cfg.TRAIN.BATCH_SIZE_PER_GPU),
                           "image": [int(s) for s in x.shape[1:]], "threads": torch.get_num_threads(),
                           "f_flops": f_flops(model, size),
                           "forward_flops": forward_flops(model, cfg.MODEL.IN_CHANNELS, size, **_call(kind))}
    out["f_evals"] = _f_calls(model, x[:1], kind)
    out["train_channels_last"] = bool(cfg.TRAIN.CHANNELS_LAST)
    out.update(_train_step_cost(training_layout(model, cfg), cfg, x, y, spec.repeats, amp))
    xi, _ = first_batch(cfg, spec.infer_batch)
    out["infer_batch"] = spec.infer_batch
    # what the evaluation tools run (TEST.FOLD_BN, TEST.CHANNELS_LAST)
    out["infer_fold_bn"], out["infer_channels_last"] = bool(cfg.TEST.FOLD_BN), bool(cfg.TEST.CHANNELS_LAST)
    out["images_per_s"] = _inference_rate(evaluation_model(model, cfg), xi, spec.repeats, amp)
    return out


def model_costs(specs: Sequence[CostSpec]) -> List[Dict[str, Any]]:
    """:func:`model_cost_worker` of each spec, each in a fresh spawned process."""
    ctx = multiprocessing.get_context("spawn")
    rows = []
    for spec in specs:
        logger.info("measuring %s", spec.cfg)
        with ctx.Pool(1) as pool:
            rows.append(pool.apply(model_cost_worker, (spec,)))
    return rows


def format_costs(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| config | MODEL.NAME | compute | parameters | MFLOPs / f | f per forward | MFLOPs / forward | "
             "train step (s) | step peak RSS (MiB) | process peak RSS (MiB) | inference (images/s) |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        f = "n/a" if r["f_flops"] is None else f"{r['f_flops'] / 1e6:.2f}"
        compute = r.get("dtype", "float32") + (", channels-last training" if r.get("train_channels_last") else "")
        lines.append(f"| {Path(r['cfg']).name} | {r['model']} | {compute} | {r['parameters']:,} | {f} | "
                     f"{r['f_evals'] if r['f_evals'] is not None else 'n/a'} | {r['forward_flops'] / 1e6:.1f} | "
                     f"{r['train_step_s']:.3f} | {r['step_peak_mib']:.0f} | {r['process_peak_mib']:.0f} | "
                     f"{r['images_per_s']:.0f} |")
    first = rows[0] if rows else {}
    lines += ["", f"training step at the config's batch ({first.get('batch')} for the first), inference at batch "
                  f"{first.get('infer_batch')}, {first.get('threads')} thread(s); an equilibrium model at tolerance 0"]
    return "\n".join(lines)
