"""What a benchmark measures (:class:`BenchSpec`: a config, a batch, a device) and building it:
the model and a batch of real images."""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, List, Tuple

import torch

from ...config import ConfigError, load_config
from ...models import forward_kind, get_cls_net
from ...utils.checkpoint import load_weights
from ..sample_images import tool_batch

Tensor = torch.Tensor


@dataclass
class BenchSpec:
    """What to benchmark: one config and batch on one device (picklable, for the memory worker)."""

    cfg: str
    opts: List[Any] = field(default_factory=list)
    batch_size: int = 32
    image_size: int = 32
    test_model: str = ""
    images: str = ""          # a recorded batch (see sample_images.recorded_batch); default: photo crops
    device: str = "cpu"
    threads: int = 0          # torch.set_num_threads in workers (0: leave as is)
    seed: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "BenchSpec":
        """The spec of a tool's parsed command line (the arguments of
        :func:`mdeq.programs.launch.add_spec_arguments`)."""
        return cls(cfg=args.cfg, opts=list(args.opts), batch_size=args.batch_size, image_size=args.image_size,
                   test_model=args.testModel, images=args.images, device=args.device, threads=args.threads)


def build(spec: BenchSpec) -> Tuple[torch.nn.Module, Tensor, Tensor]:
    """The classification model of ``spec`` (weights from ``test_model`` if given) on its device,
    a batch of real images x (N, 3, S, S) (``spec.images``, or crops of photographs) and labels y (N,)."""
    cfg = load_config(spec.cfg, list(spec.opts))
    torch.manual_seed(spec.seed)
    model = get_cls_net(cfg)
    if forward_kind(model) != "equilibrium":
        raise ConfigError(f"the solver benchmark needs an equilibrium: MODEL.NAME {cfg.MODEL.NAME!r} is a "
                          f"{forward_kind(model)} network (tools/model_cost.py measures any model)")
    if spec.test_model:
        load_weights(model, spec.test_model)
    device = torch.device(spec.device)
    model.to(device)
    x = tool_batch(spec.images, spec.batch_size, spec.image_size, cfg, spec.seed).to(device)
    y = (torch.arange(spec.batch_size) % cfg.MODEL.NUM_CLASSES).to(device)
    return model, x, y
