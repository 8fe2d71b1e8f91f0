"""What the contraction of a trained Lipschitz MDEQ buys (docs/lipschitz.md): its certified bound, each
convolution's certified norm against its power estimate and cap, the empirical constant at real inputs,
and the plain-iteration steps that the forward and the adjoint solve take to a tolerance, against the
a-priori count of the certified bound.

``tools/lipschitz_report.py`` prints :func:`lipschitz_report`'s figures as a Markdown table.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config.validation import apriori_steps

#: power steps of each convolution's norm estimate (from its persistent vector and from a random start)
CONV_ITERS = 200


def _conv_norms(model: nn.Module) -> Dict[str, Dict[str, float]]:
    """Per capped convolution of f: its power estimate, its certified norm and its cap."""
    generator = torch.Generator().manual_seed(0)
    return {name: {"estimate": conv.operator_norm(CONV_ITERS, 1, generator), "certified": conv.certified_norm(),
                   "cap": conv.cap} for name, conv in model.fullstage.capped_convs()}


def _steps_to(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, tol: float, budget: int) -> Dict[str, Any]:
    """Forward and adjoint plain-iteration steps (and their final relative residuals) to relative residual
    ``tol`` for a batch: one implicit training-style call in evaluation mode (no dropout), both solves
    ``fixed_point`` with ``budget`` steps at most."""
    logits, info = model(images, return_info=True, solver="fixed_point", f_thres=budget, b_thres=budget, eps=tol)
    F.cross_entropy(logits, labels).backward()
    return {"f_steps": info.f_steps, "f_rel": info.f_rel, "b_steps": info.b_steps, "b_rel": info.b_rel}


def lipschitz_report(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, tols: Sequence[float] = (1e-3, 1e-5),
                     empirical_iters: int = 30, batch: int = 100, budget: int = 300) -> Dict[str, Any]:
    """The figures of a Lipschitz MDEQ ``model`` on held-out ``images`` (N, C, H, W) with ``labels`` (N,).

    Returns:
        ``certified`` (the bound of f) and ``target``; ``convs`` (:func:`_conv_norms`); ``empirical_max`` /
        ``empirical_mean`` of ||J_f(z*)|| over the images (``empirical_iters`` power steps each); per
        tolerance ``steps[tol]``: the largest forward / backward steps and residuals over batches of
        ``batch`` images, and ``apriori[tol]``: the a-priori counts at TARGET and at the certified bound.
    """
    if not getattr(model, "lipschitz", False):
        raise ValueError("lipschitz_report: the model is not a Lipschitz MDEQ (MODEL.LIPSCHITZ.ENABLED)")
    model.eval()
    cert = model.lipschitz_certificate()
    convs = _conv_norms(model)
    empirical = torch.cat([model.lipschitz_empirical(images[i:i + batch], empirical_iters)
                           for i in range(0, len(images), batch)])
    steps, apriori = {}, {}
    for tol in tols:
        runs = [_steps_to(model, images[i:i + batch], labels[i:i + batch], tol, budget)
                for i in range(0, len(images), batch)]
        steps[tol] = {k: max(r[k] for r in runs) for k in runs[0]}
        apriori[tol] = {"target": apriori_steps(cert.target, tol), "certified": apriori_steps(cert.bound, tol)}
    model.zero_grad(set_to_none=True)
    return {"certified": cert.bound, "target": cert.target, "convs": convs, "images": len(images),
            "empirical_max": float(empirical.max()), "empirical_mean": float(empirical.mean()),
            "steps": steps, "apriori": apriori}


def report_table(r: Dict[str, Any]) -> str:
    """:func:`lipschitz_report`'s figures as a Markdown table."""
    convs = r["convs"].values()
    est_over_cap = [c["estimate"] / c["cap"] for c in convs]
    cert_over_est = [c["certified"] / c["estimate"] for c in convs]
    rows = [("certified Lipschitz bound of f (TARGET)", f"{r['certified']:.3f} ({r['target']:g})"),
            ("convolutions' power estimate / cap", f"{min(est_over_cap):.3f}-{max(est_over_cap):.3f}"),
            ("convolutions' certified norm / power estimate", f"{min(cert_over_est):.4f}-{max(cert_over_est):.4f}"),
            (f"empirical ||J_f(z*)||, largest / mean over {r['images']} images",
             f"{r['empirical_max']:.3f} / {r['empirical_mean']:.3f}")]
    for tol, s in r["steps"].items():
        a = r["apriori"][tol]
        rows.append((f"forward / backward plain steps to {tol:g} (largest over batches)",
                     f"{s['f_steps']} / {s['b_steps']} (residuals {s['f_rel']:.1e} / {s['b_rel']:.1e})"))
        rows.append((f"a-priori count at {tol:g}: at TARGET / at the certified bound", f"{a['target']} / {a['certified']}"))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
