"""The command line every tool shares (mdeq.programs.launch)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mdeq.programs.launch import base_parser, config_from_args, parse_args


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


@pytest.mark.slow
def test_retained_freed_cpu_memory_stops_page_faults(tmp_path):
    # in a fresh process (the setting is process-wide). glibc's own thresholds adapt to what the
    # process did before, so the test fixes them: small (every 16 MiB block mmapped and unmapped,
    # fresh pages each time), then retain_freed_memory()'s (no new pages after the first round)
    script = tmp_path / "faults.py"
    script.write_text(
        "import resource, torch\n"
        "from mdeq.utils.cpu_allocator import retain_freed_memory\n"
        "def faults():\n"
        "    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    for _ in range(10):\n"
        "        blocks = [torch.ones(4 << 20) for _ in range(6)]   # 6 x 16 MiB alive, then freed\n"
        "        del blocks\n"
        "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0\n"
        "small = retain_freed_memory(128 << 10, 128 << 10)\n"
        "before = faults()\n"
        "ok = retain_freed_memory()\n"
        "faults()\n"
        "print(int(small), before, int(ok), faults())\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    small, before, ok, after = (int(v) for v in out.stdout.split())
    assert small == 1 and ok == 1
    assert before > 10 * 4096 and after < before / 10, (before, after)   # 16 MiB = 4096 pages
