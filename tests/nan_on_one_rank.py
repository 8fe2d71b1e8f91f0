"""Run a training tool with a non-finite loss on ONE rank at ONE step (a test helper, not a test).

    python -m torch.distributed.run --nproc_per_node=2 tests/nan_on_one_rank.py {cls,seg} --cfg ... [KEY VALUE ...]

The environment variables NAN_RANK (default 1) and NAN_STEP (default 2, 0-based training step)
choose where. The tools themselves are unchanged: the task's criterion is wrapped from outside.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

from mdeq.tasks import classification, segmentation
from mdeq.programs.cli import tool_main


class NaNOnce(nn.Module):
    """The task's criterion, whose value is NaN on rank ``rank`` at its ``step``-th training call."""

    def __init__(self, inner: nn.Module, rank: int, step: int) -> None:
        super().__init__()
        self.inner, self.rank, self.step, self.calls = inner, rank, step, 0

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.inner(output, target)
        if self.training:
            if self.calls == self.step and dist.get_rank() == self.rank:
                loss = loss * float("nan")
            self.calls += 1
        return loss


def _patch(task_cls) -> None:
    build = task_cls.build_criterion
    rank, step = int(os.environ.get("NAN_RANK", "1")), int(os.environ.get("NAN_STEP", "2"))
    task_cls.build_criterion = lambda self, cfg: NaNOnce(build(self, cfg), rank, step)


if __name__ == "__main__":
    which, argv = sys.argv[1], sys.argv[2:]
    if which == "cls":
        _patch(classification.ClassificationTask)
        tool_main(lambda a=None: classification.train(argv))
    else:
        _patch(segmentation.SegmentationTask)
        tool_main(lambda a=None: segmentation.train_main(segmentation.parse_seg_args("seg", argv=argv)))
