"""The peer comparison against torchdeq (tools/compare_torchdeq.py, mdeq.analysis.peer_comparison): on the
same f both sides compute the same thing (plain iteration: equal outputs, equal gradients with torchdeq's
hook IFT), each side pays the evaluations of f that the tables say, and the tables hold their rows.
Without torchdeq (an optional dependency) those tests are skipped, and the tool says how to install it."""
from __future__ import annotations

import sys

import pytest
import torch

from conftest import one_error_line, patched_tool, run_process
from mdeq.analysis.benchmark import BenchSpec, build
from mdeq.analysis.peer_comparison import INSTALL_HINT, PEER_EXTRA_EVALS, format_table

TINY = dict(cfg="experiments/cifar/cls_mdeq_TINY.yaml", opts=["MODEL.DROPOUT", "0.0"], batch_size=2)
T = 6


@pytest.fixture(scope="module")
def tiny(reference):
    """The reference CIFAR TINY model without dropout, a batch of 2 photo crops and labels, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    spec = BenchSpec(test_model=str(reference / "cifar_tiny.pkl"), **TINY)
    yield spec, *build(spec)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def peer():
    pytest.importorskip("torchdeq")
    from mdeq.analysis import peer_comparison
    return peer_comparison


def test_fixed_point_iteration_agrees_with_torchdeq(peer, tiny):
    """Plain iteration, T forward / T backward: the same equilibrium output and logits bit for bit;
    with torchdeq's hook IFT (J at z*, as ours) the same gradients, with its default autograd.Function
    (J at f(z*)) close ones at this residual."""
    _, model, x, y = tiny
    chk = peer.fixed_point_check(model, x, y, T, T)
    assert chk["lowest_last"] == chk["batch"] == 2     # the condition for equal outputs (see fixed_point_check)
    assert chk["out_max_abs"] <= 1e-5 and chk["out_rel"] <= 1e-6, chk
    assert chk["logits_max_abs"] <= 1e-5, chk
    hook, function = chk["ift_hook"], chk["ift_function"]
    assert hook["grad_cosine"] > 0.9999 and hook["grad_rel"] < 1e-4, hook
    assert hook["worst_param_cosine"] > 0.999, hook
    assert 0.9 < function["grad_cosine"] < hook["grad_cosine"], function
    # ours: T evaluations, the one application at z*, T VJPs; torchdeq: T - 1 iterations give the same z*
    assert chk["ours"] == {"f_evals": T, "f_graph": 1, "adjoint": T, "f_no_grad": T}
    assert {k: hook[k] for k in ("f_evals", "f_graph", "adjoint")} == {"f_evals": T - 1, "f_graph": 1, "adjoint": T}
    assert function["f_graph"] == 2   # torchdeq's autograd.Function evaluates f again in the backward


@pytest.mark.parametrize("solver", ["broyden", "anderson"])
def test_each_side_pays_the_evaluations_asked_for(peer, tiny, solver):
    """With matched budgets both sides make exactly T_f evaluations of f and T_b VJPs; with torchdeq's
    budgets as given, its Broyden makes one more of each (g(x0) before its first step)."""
    _, model, x, y = tiny
    f_thres, b_thres = 5, 4
    matched = peer.counted_train_steps(model, x, y, solver, f_thres, b_thres)
    assert matched["ours"] == {"f_evals": f_thres, "f_graph": 1, "adjoint": b_thres, "f_no_grad": f_thres}
    assert matched["ours_info"]["f_steps"] == f_thres and matched["ours_info"]["b_steps"] == b_thres
    assert matched["peer"] == {"f_evals": f_thres, "f_graph": 2, "adjoint": b_thres, "f_no_grad": f_thres}
    extra = PEER_EXTRA_EVALS[solver]
    assert matched["peer_budget"] == [f_thres - extra, b_thres - extra]
    raw = peer.counted_train_steps(model, x, y, solver, f_thres, b_thres, match_evals=False, hook_ift=True)
    assert raw["peer_budget"] == [f_thres, b_thres]
    assert raw["peer"] == {"f_evals": f_thres + extra, "f_graph": 1, "adjoint": b_thres + extra,
                           "f_no_grad": f_thres + extra}


def test_the_check_budget_is_where_every_residual_is_lowest_at_the_end(peer, tiny):
    res = torch.tensor([[1.0, 1.0], [0.5, 0.6], [0.4, 0.7], [0.3, 0.5], [0.3, 0.4]])   # (T, B)
    assert peer.lowest_at_last(res, 3).tolist() == [True, False]
    assert peer.lowest_at_last(res, 4).tolist() == [True, True]
    assert peer.lowest_at_last(res, 5).tolist() == [False, True]   # equal to an earlier one: not better
    _, model, x, _ = tiny
    t = peer.check_budget(model, x, T)
    assert 2 <= t <= T and bool(peer.same_iterate(peer.forward_residuals(model, x, T), t).all())
    assert peer.same_iterate(res, 4).tolist() == [True, False]     # torchdeq ranks the first 3 rows


def test_the_history_sizes_are_ours(peer, tiny):
    """torchdeq's Broyden columns and Anderson iterates: MODEL.SOLVER_MEMORY, at most the budget."""
    _, model, _, _ = tiny
    memory = model.solver_settings["f"]["memory"]
    assert memory == 60       # the TINY config's
    assert peer.peer_options(model, "broyden", 22, "f") == {"LBFGS_thres": 22, "ls": False}
    model.deq.solver_settings["b"]["memory"] = 12
    try:
        assert peer.peer_options(model, "anderson", 24, "b") == {"m": 12, "lam": 1e-4, "tau": 1.0}
        assert peer.peer_options(model, "anderson", 8, "b")["m"] == 8
    finally:
        model.deq.solver_settings["b"]["memory"] = memory


def test_the_tables_hold_every_row(peer, tiny):
    spec, *_ = tiny
    result = peer.run_peer_comparison(spec, 4, 4, ["broyden", "anderson"], repeats=1)
    text = format_table(result)
    for row in ("| broyden |", "| anderson |"):
        assert text.count(row) == 2, text          # the training-step table and the forward-solve one
    assert "| broyden | " in text and "| 4 / 4 | 1 / 2 | 4 / 4 | 3 / 3 |" in text, text
    assert "| 4 / 4 | 1 / 2 | 4 / 4 | 4 / 4 |" in text, text   # Anderson: torchdeq max_iter as ours
    for needle in ("batch 2", "1 threads", f"torch {torch.__version__.split('+')[0]}", "torchdeq 0.1.0",
                   "T_f=4, T_b=4", "memory 60", "Fixed-point check", "speed-up (peer/ours)"):
        assert needle in text, (needle, text)
    assert [r["solver"] for r in result["train"]] == [r["solver"] for r in result["forward"]] == ["broyden",
                                                                                                    "anderson"]
    assert all(r["ours_ms"] > 0 and r["peer_ms"] > 0 for r in result["train"] + result["forward"])


def test_format_table_from_a_stored_result():
    """format_table needs only the JSON (no torchdeq): a stored result prints its rows."""
    counts = {"f_evals": 22, "f_graph": 1, "adjoint": 24, "f_no_grad": 22}
    result = {"cfg": "c.yaml", "opts": [], "batch": 8, "image_size": 32, "device": "cpu", "cpu": "X", "threads": 1,
              "torch": "2.0", "torchdeq": "0.1.0", "f_thres": 22, "b_thres": 24, "memory": 60, "stop_mode": "rel",
              "core": "sliced", "hook_ift": False, "match_evals": True, "repeats": 3,
              "train": [{"solver": "broyden", "ours_ms": 100.0, "peer_ms": 150.0, "speedup": 1.5, "ours": counts,
                         "peer": dict(counts, f_graph=2), "peer_budget": [21, 23]}],
              "forward": [{"solver": "broyden", "ours_ms": 40.0, "peer_ms": 50.0, "speedup": 1.25,
                           "ours_f_evals": 22, "peer_f_evals": 22, "ours_rel": 0.01, "peer_rel": 0.02}]}
    text = format_table(result)
    assert "| broyden | 100.0 | 150.0 | 1.50x | 22 / 22 | 1 / 2 | 24 / 24 | 21 / 23 |" in text, text
    assert "| broyden | 40.0 | 50.0 | 1.25x | 22 / 22 | 1.00e-02 / 2.00e-02 |" in text, text
    assert "torchdeq 0.1.0" in text and "(X), 1 threads" in text and "Fixed-point check" not in text


def test_without_torchdeq_the_tool_says_how_to_install_it(tmp_path):
    hidden = "import sys; sys.modules['torchdeq'] = None"      # import torchdeq fails as when not installed
    proc = run_process([sys.executable, *patched_tool("compare_torchdeq.py", hidden),
                        "--cfg", "experiments/cifar/cls_mdeq_TINY.yaml", "--json", tmp_path / "r.json"], expect=None)
    one_error_line(proc, "torchdeq", INSTALL_HINT)
    assert not (tmp_path / "r.json").exists()
