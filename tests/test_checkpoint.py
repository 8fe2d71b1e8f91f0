"""Checkpoint safety: no code runs on load, writes are atomic, the original's keys are understood."""
from __future__ import annotations

import os

import pytest
import torch

from mdeq.config import load_config
from mdeq.models import BACKBONE_PREFIXES, MDEQNet, get_cls_net, get_seg_net
from mdeq.utils.checkpoint import (CheckpointError, extract_state_dict, load_checkpoint, load_pretrained,
                                   load_weights, model_aliases, save_checkpoint)


def test_a_pickle_that_runs_code_is_refused_and_the_code_does_not_run(evil_pickle):
    bad, marker = evil_pickle
    with pytest.raises(CheckpointError, match="refused to load .*evil.pkl.*arbitrary unpickling"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError):
        load_weights(torch.nn.Linear(2, 2), bad)
    assert not marker.exists()


def test_truncated_and_empty_files_are_clear_errors(tmp_path):
    good = tmp_path / "good.pth"
    save_checkpoint({"model": torch.nn.Linear(50, 50).state_dict(), "epoch": 3}, good)
    data = good.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    assert load_checkpoint(good)["epoch"] == 3


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pth.tar"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def exploding_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar"]  # no temporary file left behind


def test_extract_state_dict_understands_wrappers_and_the_original_aliases():
    w = torch.ones(2)
    assert extract_state_dict({"model": {"module.a.weight": w}}) == {"a.weight": w}
    assert extract_state_dict({"state_dict": {"a": w}, "epoch": 3}) == {"a": w}
    original = {"fullstage.x": w, "deq.func.x": w, "fullstage_copy.x": w, "deq.func_copy.x": w, "head.y": w}
    aliases = MDEQNet.state_dict_aliases   # the model's table, not the checkpoint module's knowledge
    assert set(extract_state_dict(original, aliases=aliases)) == {"fullstage.x", "head.y"}
    assert set(extract_state_dict({"deq.func.x": w, "head.y": w}, aliases=aliases)) == {"fullstage.x", "head.y"}
    assert set(extract_state_dict(original)) == set(original)   # without a table nothing is renamed
    assert model_aliases(torch.nn.Linear(1, 1)) == {} and model_aliases(MDEQNet) is aliases
    with pytest.raises(CheckpointError, match="no state dict"):
        extract_state_dict({"epoch": 3})


def test_classification_checkpoint_initialises_the_segmentation_backbone(repo, tmp_path):
    opts = ["MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", "[8, 16, 16, 16]", "MODEL.EXPANSION_FACTOR", "2"]
    cls = get_cls_net(load_config(repo / "experiments/imagenet/cls_mdeq_SMALL_paper.yaml", opts + [
        "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", "[4, 4, 4, 4]", "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", "16"]))
    path = tmp_path / "imagenet.pth.tar"
    save_checkpoint({"model": cls.state_dict(), "epoch": 5}, path)
    seg = get_seg_net(load_config(repo / "experiments/cityscapes/seg_mdeq_SMALL_paper.yaml", opts))
    report = load_pretrained(seg, path, BACKBONE_PREFIXES)
    assert report["missing"] and all(k.startswith("last_layer.") for k in report["missing"])
    assert any(k.startswith("classifier.") for k in report["unexpected"])
    seg_sd, cls_sd = seg.state_dict(), cls.state_dict()
    for k in seg_sd:
        if k.startswith(("downsample.", "stage0.", "fullstage.")):
            assert torch.equal(seg_sd[k], cls_sd[k]), k
    # a checkpoint that lacks f_theta is refused
    save_checkpoint({"model": {k: v for k, v in cls_sd.items() if not k.startswith("fullstage.")}}, path)
    with pytest.raises(CheckpointError, match="lacks weights the model needs"):
        load_pretrained(seg, path, BACKBONE_PREFIXES)
