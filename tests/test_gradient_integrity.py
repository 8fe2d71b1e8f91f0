"""No gradient goes silently wrong: every parameter trains under autocast in each backward mode, the
reversible backward reverses exactly the f of its forward (or says why it cannot), and a run that
picks ``model_best`` on a test set says so."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeq.config import load_config
from mdeq.core.trainer import build_run
from mdeq.datasets import selection_on_test_set
from mdeq.models import get_cls_net
from mdeq.modules import EquilibriumLayer, coupled_steps, weights_fixed
from mdeq.tasks.classification import ClassificationTask
from mdeq.utils.distributed import DistInfo

from test_reversible import DIGITS_REV, _layer, _rel, _tiny_mdeq

DIGITS = "experiments/digits/cls_mdeq_digits.yaml"


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool = False, between=None):
    """{name: gradient} of one training step's cross-entropy; ``between()`` runs after the forward pass,
    before the backward."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        logits, info = model(x, return_info=True)
        loss = F.cross_entropy(logits.float(), y)
    if between is not None:
        between()
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}, info


@pytest.mark.parametrize("grad", ["implicit", "phantom", "jfb", "reversible"])
def test_every_parameter_gets_a_gradient_in_an_equilibrium_step_under_autocast(grad):
    opts = ["MODEL.F_THRES", 4, "MODEL.B_THRES", 4, "MODEL.GRAD", grad]
    if grad == "reversible":
        opts += ["MODEL.F_SOLVER", "reversible"]
    model, x, y = _tiny_mdeq(*opts)
    model.train()
    seen = []
    stage = model.fullstage.forward
    model.fullstage.forward = lambda *a: seen.append(torch.is_autocast_cache_enabled()) or stage(*a)
    grads, info = _grads(model, x, y, amp=True)
    assert info.mode == "equilibrium" and info.b_steps
    # f never runs with autocast's weight cache: a bfloat16 copy cast under the solve's no_grad would
    # otherwise be reused without its history by the differentiable f (pytorch issues 112583, 158232)
    assert seen and not any(seen)
    missing = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all() or not g.abs().sum() > 0]
    assert not missing, f"{grad}: no (finite, non-zero) gradient for {missing}"
    assert any(n.startswith("fullstage.fuse") or ".fuse" in n for n in grads), "the fusion's convolutions are covered"


def _dropout_mdeq(*opts):
    return _tiny_mdeq("MODEL.F_THRES", 4, "MODEL.DROPOUT", 0.3, "MODEL.REV_FLOAT64_STATES", True, *opts)


@pytest.mark.parametrize("change", ["another call", "eval mode"])
def test_the_mdeq_reversible_backward_reverses_the_forward_f_whatever_happens_before_it(change):
    """The MDEQ's f keeps its dropout masks and train/eval flags: a call that draws new masks, or
    ``model.eval()``, between the forward and the backward leaves the gradient as it was."""
    model, x, y = _dropout_mdeq()
    model.double().train()
    x = x.double()
    torch.manual_seed(3)
    ref, _ = _grads(model, x, y)

    def between():
        if change == "eval mode":
            model.eval()
        else:
            model(torch.randn_like(x))          # draws new dropout masks

    torch.manual_seed(3)
    ours, info = _grads(model, x, y, between=between)
    assert 0 <= info.b_rev_error < 1e-8
    for name, g in ref.items():
        assert g is not None and torch.allclose(ours[name], g, rtol=1e-10, atol=1e-14), name
    # the model keeps what the caller set after the backward
    assert model.training == (change != "eval mode")


def test_an_f_that_changed_between_forward_and_backward_is_an_error():
    torch.manual_seed(0)
    w = torch.randn(6, 6, requires_grad=True)
    state = {"mask": torch.ones(6), "scale": torch.full((6,), 0.5)}
    f = lambda z: torch.tanh((z * state["mask"]) @ w.T * state["scale"])  # noqa: E731
    z, _ = _layer(3, 0.8)(f, torch.zeros(2, 6))
    state["mask"] = torch.ones(6)                       # a mask drawn again
    with pytest.raises(RuntimeError, match="no longer reads 1 tensor"):
        z.sum().backward()
    z, _ = _layer(3, 0.8)(f, torch.zeros(2, 6))
    state["scale"].mul_(2.0)                            # changed in place
    with pytest.raises(RuntimeError, match="changed in place after the forward"):
        z.sum().backward()


def test_an_f_that_updates_normalisation_statistics_is_refused():
    bn = nn.BatchNorm1d(6).train()
    lin = nn.Linear(6, 6)
    with pytest.raises(ValueError, match=r"changes 3 tensor\(s\) in place .*BatchNorm's running statistics"):
        _layer(3, 0.8)(lambda z: torch.tanh(bn(lin(z))), torch.zeros(4, 6))
    bn.eval()                                           # fixed statistics: the same function every time
    before = bn.running_mean.clone()
    z, _ = _layer(3, 0.8)(lambda z: torch.tanh(bn(lin(z))), torch.zeros(4, 6))
    z.sum().backward()
    assert lin.weight.grad.abs().sum() > 0 and torch.equal(bn.running_mean, before)
    bn.train()
    model, x, y = _tiny_mdeq("MODEL.F_THRES", 3)            # the MDEQ's f: GroupNorm, nothing updated
    model.train()
    assert all(g is not None for g in _grads(model, x, y)[0].values())


def test_a_captured_tensor_without_a_gradient_is_an_error():
    torch.manual_seed(0)
    w = torch.randn(6, 6, requires_grad=True)
    gate = torch.randn(6, requires_grad=True)
    f = lambda z: torch.tanh(z @ w.T + 1.0) * (gate > 0)  # noqa: E731  read, but no gradient reaches it
    z, _ = _layer(3, 0.8)(f, torch.zeros(2, 6))
    with pytest.raises(RuntimeError, match=r"1 tensor\(s\) that f read in the forward pass \(shapes \[\(6,\)\]\) "
                                           "received no gradient"):
        z.sum().backward()


def test_under_autocast_the_reversible_states_are_float64_and_the_gradient_that_of_the_steps(caplog):
    """At 6 steps, float32 states under bfloat16 autocast rebuild a start that lies ~1e2 (relative) from
    z0 and a gradient with cosine ~0.7 to the steps' (docs/reversible.md); float64 states are exact."""
    model, x, y = _tiny_mdeq("MODEL.F_THRES", 6, "MODEL.DROPOUT", 0.0, "MODEL.REV_FLOAT64_STATES", False)
    model.train()
    with caplog.at_level(logging.INFO, logger="mdeq.modules.equilibrium"):
        ours, info = _grads(model, x, y, amp=True)
    assert "states are kept in float64" in caplog.text
    assert info.b_rev_error < 1e-8
    params = [p for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with weights_fixed(model.fullstage):
            problem = model.equilibrium_problem(model.injection(x))
            z = coupled_steps(problem.f, problem.z0, 6, model.deq.solver_settings["f"]["rev_beta"], float64_states=True)
        loss = F.cross_entropy(model.head(problem.unflatten(z)).float(), y)
    ref = torch.autograd.grad(loss, params)
    flat = lambda gs: torch.cat([g.flatten() for g in gs])  # noqa: E731
    assert _rel(flat(list(ours.values())), flat(ref)) < 1e-5


def test_a_run_choosing_model_best_on_a_test_set_says_so_in_one_warning(repo, tmp_path, caplog):
    fm = load_config(repo / "experiments/fashion_mnist/cls_mdeq_fmnist.yaml", ["DATASET.TEST_SET", "test"])
    note = selection_on_test_set(fm)
    assert "DATASET.TEST_SET 'test'" in note and "DATASET.TEST_SET val" in note and "\n" not in note
    for split in ("val", ""):
        assert selection_on_test_set(load_config(repo / "experiments/fashion_mnist/cls_mdeq_fmnist.yaml",
                                                 ["DATASET.TEST_SET", split])) is None
    cifar = selection_on_test_set(load_config(repo / "experiments/cifar/cls_mdeq_TINY.yaml"))
    assert "CIFAR-10's test batch" in cifar and "final_state.pth" in cifar
    assert selection_on_test_set(load_config(repo / DIGITS)) is None
    assert ClassificationTask().selection_warning(fm) == note

    class OnTest(ClassificationTask):
        def selection_warning(self, cfg):
            return note

    cfg = load_config(repo / DIGITS, ["OUTPUT_DIR", str(tmp_path)])
    with caplog.at_level(logging.WARNING, logger="mdeq.core.trainer"):
        build_run(OnTest(), cfg, DistInfo(), str(tmp_path / "tb"))
        build_run(ClassificationTask(), cfg, DistInfo(), str(tmp_path / "tb2"))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "mdeq.core.trainer"]
    assert warned == [note]
