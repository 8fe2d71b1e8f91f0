"""The command line every tool shares (mdeq.core.launch)."""
from __future__ import annotations

import pytest

from mdeq.core.launch import base_parser, config_from_args, parse_args


def test_options_may_stand_between_overrides_and_directories_prefix_relative_paths(repo, tmp_path):
    p = base_parser("test")
    args = parse_args(p, ["--cfg", str(repo / "experiments/cityscapes/seg_mdeq_SMALL.yaml"), "TRAIN.LR", "0.02",
                          "--dataDir", str(tmp_path), "TRAIN.MAX_ITERS", "-1", "--modelDir", str(tmp_path / "o"),
                          "MODEL.PRETRAINED", "pretrained/x.pkl", "OUTPUT_DIR", "ignored"])
    assert args.opts == ["TRAIN.LR", "0.02", "TRAIN.MAX_ITERS", "-1", "MODEL.PRETRAINED", "pretrained/x.pkl",
                         "OUTPUT_DIR", "ignored"]
    cfg = config_from_args(args)
    assert cfg.TRAIN.LR == 0.02 and cfg.TRAIN.MAX_ITERS == -1
    assert cfg.OUTPUT_DIR == str(tmp_path / "o")                      # the option wins over KEY VALUE
    assert cfg.DATASET.ROOT == str(tmp_path) + "/data/"                # relative: under --dataDir
    assert cfg.MODEL.PRETRAINED == str(tmp_path / "pretrained/x.pkl")
    absolute = parse_args(p, ["--cfg", str(repo / "experiments/cityscapes/seg_mdeq_SMALL.yaml"), "--dataDir",
                              str(tmp_path), "DATASET.ROOT", "/elsewhere"])
    assert config_from_args(absolute).DATASET.ROOT == "/elsewhere"    # absolute: kept


def test_an_unknown_option_is_a_usage_error(repo, capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(base_parser("test"), ["--cfg", "x.yaml", "--lr", "0.1"])
    assert e.value.code == 2 and "--lr" in capsys.readouterr().err
