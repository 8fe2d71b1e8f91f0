"""The equilibrium layer (mdeq.modules.equilibrium) on a map that is not an MDEQ: a small fully
connected f(z) = tanh(z W^T + x U^T) with a contractive W, in float64, where the exact implicit
gradient is a dense linear solve."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from mdeq.modules import LOGGED_KEYS, EquilibriumInfo, EquilibriumLayer

LAYER_PAGE = Path(__file__).resolve().parents[1] / "docs" / "equilibrium_layer.md"
B, D = 3, 6


class Problem:
    """W (D, D) with spectral norm ``scale`` (f is then a contraction), U (D, D), x (B, D), a fixed
    cotangent c (B, D) for the loss sum(c * z); all float64 leaves that require grad."""

    def __init__(self, scale: float = 0.6, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.W = (scale * w / torch.linalg.matrix_norm(w, 2)).requires_grad_()
        self.U = torch.randn(D, D, generator=g, dtype=torch.float64).requires_grad_()
        self.x = torch.randn(B, D, generator=g, dtype=torch.float64).requires_grad_()
        self.c = torch.randn(B, D, generator=g, dtype=torch.float64)
        self.calls = 0

    def f(self, z: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(z @ self.W.T + self.x @ self.U.T)

    @property
    def leaves(self):
        return [self.W, self.U, self.x]

    def z0(self) -> torch.Tensor:
        return torch.zeros(B, D, dtype=torch.float64)

    def fixed_point(self) -> torch.Tensor:
        """z* by plain iteration of the contraction to machine precision, without autograd."""
        z = self.z0()
        with torch.no_grad():
            for _ in range(500):
                z = self.f(z)
        return z

    def grads(self, z: torch.Tensor):
        return torch.autograd.grad((self.c * z).sum(), self.leaves)


def _layer(**kw) -> EquilibriumLayer:
    opts = dict(f_thres=100, b_thres=100, f_eps=1e-12, b_eps=1e-12, stop_mode="abs")
    opts.update(kw)
    return EquilibriumLayer(**opts)


def exact_implicit_gradient(p: Problem):
    """dl/d(W, U, x) by the implicit function theorem with the adjoint system solved densely: per
    sample, J_b = diag(1 - tanh^2(a_b)) W at z*, w_b = (I - J_b^T)^{-1} c_b, pushed through f at z*."""
    z_star = p.fixed_point()
    with torch.no_grad():
        s = 1 - torch.tanh(z_star @ p.W.T + p.x @ p.U.T) ** 2            # (B, D)
        eye = torch.eye(D, dtype=torch.float64)
        w = torch.stack([torch.linalg.solve(eye - (s[b, :, None] * p.W).T, p.c[b]) for b in range(B)])
    return torch.autograd.grad(p.f(z_star), p.leaves, w)


def test_forward_reaches_the_equilibrium_and_the_backward_fills_the_same_info():
    p = Problem()
    z, info = _layer()(p.f, p.z0())
    with torch.no_grad():
        assert (p.f(z) - z).norm() < 1e-10
    assert info.mode == "equilibrium" and 0 < info.f_steps <= 100 and info.f_abs < 1e-10
    assert info.f_diverged is False and not info.diverged and len(info.f_trace) == info.f_steps
    assert (info.b_steps, info.b_abs, info.b_rel, info.b_fallback, info.b_trace) == (None,) * 5
    assert set(info.scalars()) == {"f_steps", "f_abs", "f_rel"} and info.jac_loss is None
    (p.c * z).sum().backward()
    assert info.b_steps > 0 and info.b_abs < 1e-10 and info.b_fallback is False and len(info.b_trace) > 0
    # every logged key but the Jacobian term's and the reversible solver's
    assert list(info.scalars()) == [k for k in LOGGED_KEYS if k not in ("jac_loss", "f_evals", "b_rev_error")]
    assert "b_fallback=0" in info.describe() and info.stats()["mode"] == "equilibrium"
    assert "f_trace" not in info.stats()


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_implicit_gradient_equals_the_dense_ift_gradient(solver):
    p = Problem()
    z, info = _layer(f_solver=solver, b_solver=solver)(p.f, p.z0())
    ours = p.grads(z)
    exact = exact_implicit_gradient(p)
    assert info.b_fallback is False
    for name, a, b in zip("WUx", ours, exact):
        assert torch.allclose(a, b, rtol=1e-7, atol=1e-9), (name, (a - b).abs().max().item())


def test_phantom_and_jfb_set_b_steps_at_once_and_give_the_expected_gradients():
    p = Problem()
    implicit = p.grads(_layer()(p.f, p.z0())[0])
    z, info = _layer(grad="jfb")(p.f, p.z0())
    assert info.b_steps == 1 and info.b_fallback is None        # known before any backward
    jfb = p.grads(z)
    one_step = p.grads(p.f(p.fixed_point()))                     # dl/dz . df/dtheta at z*
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(jfb, one_step))
    assert not torch.allclose(jfb[0], implicit[0], rtol=1e-3)   # the modes differ
    z, info = _layer(grad="phantom", phantom_steps=60, phantom_tau=1.0)(p.f, p.z0())
    assert info.b_steps == 60
    phantom = p.grads(z)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-9) for a, b in zip(phantom, implicit))
    with pytest.raises(ValueError, match="grad must be one of"):
        EquilibriumLayer(grad="unroll")


def test_unrolled_mode_applies_f_depth_times_with_backprop():
    p = Problem()
    z, info = _layer(depth=4)(p.f, p.z0(), mode="unrolled")
    expected = p.z0()
    for _ in range(4):
        expected = p.f(expected)
    assert torch.equal(z, expected) and z.requires_grad
    assert info.stats() == {"mode": "unrolled", "f_steps": 4}
    z, info = _layer(depth=4)(p.f, p.z0(), mode="unrolled", depth=2)
    assert info.f_steps == 2
    assert all(g.abs().sum() > 0 for g in p.grads(z))


def test_the_warm_up_rule_lives_in_the_layer():
    p = Problem()
    layer = _layer(depth=2, warmup_steps=3)
    modes = [layer(p.f, p.z0(), train_step=s)[1].mode for s in (-1, 0, 2, 3, 10)]
    assert modes == ["equilibrium", "unrolled", "unrolled", "equilibrium", "equilibrium"]
    assert layer(p.f, p.z0())[1].mode == "equilibrium"
    assert layer.resolve_mode(train_step=1) == "unrolled" and layer.resolve_mode("equilibrium") == "equilibrium"
    with pytest.raises(ValueError, match="not both"):
        layer(p.f, p.z0(), mode="unrolled", train_step=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        layer(p.f, p.z0(), mode="warmup")


@pytest.mark.parametrize("mode", ["equilibrium", "unrolled"])
def test_jac_loss_has_a_graph_and_estimates_the_frobenius_norm(mode):
    p = Problem()
    z, info = _layer(jac_probes=4000, depth=60)(p.f, p.z0(), mode=mode, jac_loss=True)
    assert info.jac_loss.requires_grad and info.jac_loss.dim() == 0
    (gw,) = torch.autograd.grad(info.jac_loss, p.W, retain_graph=True)
    assert gw.abs().sum() > 0
    with torch.no_grad():
        s = 1 - torch.tanh(p.fixed_point() @ p.W.T + p.x @ p.U.T) ** 2
        exact = sum(((s[b, :, None] * p.W) ** 2).sum() for b in range(B)) / (B * D)
    assert info.jac_loss.item() == pytest.approx(exact.item(), rel=0.1)
    assert info.scalars()["jac_loss"] == pytest.approx(info.jac_loss.item())
    with torch.no_grad():
        assert _layer()(p.f, p.z0(), jac_loss=True)[1].jac_loss is None   # no graph, no term


def test_the_call_does_not_change_the_layer_and_takes_solver_overrides():
    p = Problem()
    layer = _layer()
    z, info = layer(p.f, p.z0(), f_thres=3, eps=0.0, solver="fixed_point")
    assert info.f_steps == 3 and layer.f_thres == 100 and layer.f_solver.__name__ == "broyden"
    assert layer.solver_kwargs("f")["eps"] == 1e-12 and "beta" not in layer.solver_kwargs("f")
    with pytest.raises(ValueError, match="a pair"):
        layer(p.f, p.z0(), solver=("broyden",))
    assert list(layer.parameters()) == [] and layer.state_dict() == {}


def test_spectral_radius_only_in_evaluation_without_grad():
    p = Problem()
    layer = _layer(spectral_radius_iters=50).eval()
    with torch.no_grad():
        rho = layer(p.f, p.z0())[1].spectral_radius
    assert 0 < rho <= 0.6 + 1e-6                         # rho(diag(s) W) <= ||W|| = 0.6
    assert layer.train()(p.f, p.z0())[1].spectral_radius is None


def test_info_get_names_unknown_keys():
    info = EquilibriumInfo(mode="equilibrium", f_steps=3, b_fallback=True)
    assert info.get("f_steps") == 3.0 and info.get("b_fallback") == 1.0 and info.get("f_rel") is None
    assert info.get("mode") is None
    with pytest.raises(KeyError, match="no entry 'f_stpes'"):
        info.get("f_stpes")


def _page_example() -> str:
    """The first ```python block of docs/equilibrium_layer.md."""
    match = re.search(r"```python\n(.*?)```", LAYER_PAGE.read_text(), re.S)
    assert match, "docs/equilibrium_layer.md: no ```python block"
    return match.group(1)


def test_the_docs_example_runs():
    namespace: dict = {}
    exec(compile(_page_example(), "docs/equilibrium_layer.md example", "exec"), namespace)
    info = namespace["info"]
    assert isinstance(info, EquilibriumInfo) and info.mode == "equilibrium"
    assert info.f_steps > 0 and info.b_steps is not None and info.b_fallback is False
    assert namespace["W"].grad is not None and namespace["W"].grad.abs().sum() > 0
