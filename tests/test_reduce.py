"""The one reducer of the evaluations and the training epoch (mdeq.core.reduce)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from mdeq.core.reduce import Reducer


def test_sums_means_and_ratios_of_one_process():
    """Number sums, a tensor sum (shape and dtype kept), weighted means that skip None and ignore
    undeclared names; a ratio over an empty denominator is the given value."""
    r = Reducer(sums=("loss", "images"), means=("f_steps", "f_rel"))
    r.add({"loss": 2.0, "images": 4, "conf": torch.tensor([[1, 2], [3, 4]])}, {"f_steps": 10.0, "f_rel": None,
                                                                               "other": 5.0}, weight=4)
    r.add({"loss": 1.0, "images": 1, "conf": torch.tensor([[1, 0], [0, 1]])}, {"f_steps": 20.0, "f_rel": 0.5},
          weight=1)
    tot = r.reduce()
    assert tot.sums["loss"] == 3.0 and tot.sums["images"] == 5.0
    assert tot.sums["conf"].dtype == torch.int64 and tot.sums["conf"].tolist() == [[2, 2], [3, 5]]
    assert tot.means == {"f_steps": 12.0, "f_rel": 0.5}       # (10 * 4 + 20) / 5; f_rel from one batch
    assert tot.ratio("loss", "images", 100.0) == 60.0
    empty = Reducer(sums=("top1", "images"), means=("f_steps",)).reduce()
    assert math.isnan(empty.ratio("top1", "images")) and empty.ratio("top1", "images", empty=0.0) == 0.0
    assert empty.means == {}



def test_a_loop_cut_in_two_goes_on_from_its_first_part_totals():
    """What an interrupted epoch carries across a resume: the second part, started from the first part's
    Totals.state() (through JSON, as plain numbers), reduces to the uncut loop's sums and means."""
    batches = [({"loss": 0.5 * i, "images": 3}, {"f_steps": float(i), "f_rel": 0.1 * i if i % 2 else None})
               for i in range(1, 7)]
    whole = Reducer(sums=("loss", "images"), means=("f_steps", "f_rel"))
    first = Reducer(sums=("loss", "images"), means=("f_steps", "f_rel"))
    for sums, means in batches:
        whole.add(sums, means, weight=sums["images"])
    for sums, means in batches[:4]:
        first.add(sums, means, weight=sums["images"])
    second = Reducer(sums=("loss", "images"), means=("f_steps", "f_rel"))
    second.carry(json.loads(json.dumps(first.reduce().state())))
    for sums, means in batches[4:]:
        second.add(sums, means, weight=sums["images"])
    want, got = whole.reduce(), second.reduce()
    assert got.sums == want.sums and got.means == pytest.approx(want.means, rel=1e-15)
    assert got.parts["f_rel"][1] == 9.0                        # three batches of 3 images reported f_rel

SCRIPT = textwrap.dedent("""
    import json, os, torch, torch.distributed as dist
    from mdeq.core.reduce import Reducer
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    calls = []
    real = dist.all_reduce
    dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    r = Reducer(sums=("images",), means=("f_steps", "f_rel"))
    r.add({"conf": torch.full((2, 2), rank + 1, dtype=torch.int64)})
    if rank == 0:      # rank 1: no batch at all, only the starting values
        r.add({"images": 3}, {"f_steps": 4.0, "f_rel": 0.1}, weight=3)
        r.add({"images": 1}, {"f_steps": 8.0}, weight=1)
    tot = r.reduce()
    if rank == 0:
        print(json.dumps({"images": tot.sums["images"], "conf": tot.sums["conf"].tolist(), "means": tot.means,
                          "collectives": len(calls)}))
    dist.destroy_process_group()
""")


def test_two_processes_reduce_every_sum_in_one_collective(repo, tmp_path):
    """Rank 0 reports two batches, rank 1 none: the totals are those of the whole set, in one
    all_reduce."""
    script = tmp_path / "reduce.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], cwd=repo, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["images"] == 4.0 and r["conf"] == [[3, 3], [3, 3]] and r["collectives"] == 1
    assert r["means"] == pytest.approx({"f_steps": 5.0, "f_rel": 0.1})
