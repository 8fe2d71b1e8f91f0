"""Turn an ImageNet classification checkpoint into the backbone state dict MODEL.PRETRAINED expects.

    python pretrained_models/convert_cls_to_seg.py pretrained_models/cls_mdeq_SMALL.pkl \
        pretrained_models/MDEQ_SMALL_Cls.pth --cfg experiments/cityscapes/seg_mdeq_SMALL.yaml

The input is one of our checkpoints (``output/.../final_state.pth``, ``checkpoint.pth.tar``, a
bare state dict) or the original release's ``.pkl`` (read with ``weights_only=True``; its
duplicated equilibrium stage is reduced to ``fullstage``). The output holds the stem
(``downsample.*``, ``stage0.*``) and f_theta (``fullstage.*``) only: the classification head is
dropped. With ``--cfg`` the result is checked against the segmentation net of that config
(every stem and f_theta weight present, with the right shape).

Exit status: 0 done, 2 bad input (a missing file or one that is not a checkpoint, a checkpoint
without an equilibrium stage or that does not fit ``--cfg``; one-line message), see
:mod:`mdeq.programs.cli`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Dict, Optional, Sequence

import torch

from mdeq.programs.cli import tool_main
from mdeq.programs.launch import parse_args as parse_launch_args
from mdeq.config import load_config
from mdeq.models import BACKBONE_PREFIXES, MDEQNet, get_seg_net
from mdeq.utils.checkpoint import (CheckpointError, extract_state_dict, load_checkpoint, mismatch_listing,
                                   mismatch_report, save_checkpoint)

logger = logging.getLogger("convert_cls_to_seg")


def convert(src: str, dst: str, cfg_path: str = "", opts: Sequence[Any] = ()) -> Dict[str, torch.Tensor]:
    """Write the backbone of the classification checkpoint ``src`` to ``dst`` and return it.

    Raises:
        CheckpointError: ``src`` is not a checkpoint, has no equilibrium stage, or does not fit the
            segmentation net of ``cfg_path``.
    """
    sd = extract_state_dict(load_checkpoint(src), src, MDEQNet.state_dict_aliases)
    backbone = {k: v for k, v in sd.items() if k.startswith(BACKBONE_PREFIXES)}
    dropped = sorted({k.split(".")[0] for k in sd if not k.startswith(BACKBONE_PREFIXES)})
    if not any(k.startswith("fullstage.") for k in backbone):
        raise CheckpointError(f"{src}: no equilibrium stage (fullstage.* / deq.func.*) found; is it an MDEQ "
                              f"checkpoint?")
    if cfg_path:
        want = {k: v for k, v in get_seg_net(load_config(cfg_path, list(opts))).state_dict().items()
                if k.startswith(BACKBONE_PREFIXES)}
        report = mismatch_report(want, backbone)
        if any(report):
            raise CheckpointError(f"{src} does not fit the segmentation net of {cfg_path}" + mismatch_listing(*report))
    save_checkpoint(backbone, dst)
    logger.info("%s -> %s: %d backbone tensors kept; dropped modules: %s", src, dst, len(backbone), dropped)
    return backbone


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", help="classification checkpoint (ours or the original's .pkl)")
    p.add_argument("dst", help="output file for MODEL.PRETRAINED")
    p.add_argument("--cfg", default="", help="segmentation experiment file to check the result against")
    p.add_argument("opts", nargs="*", metavar="KEY VALUE", help="overrides of --cfg")
    # --cfg may come after the file names (a REMAINDER would swallow it and skip the check)
    return parse_launch_args(p, argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Convert as the command line ``argv`` (default ``sys.argv[1:]``) says."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    convert(args.src, args.dst, args.cfg, args.opts)


if __name__ == "__main__":
    tool_main(main)
