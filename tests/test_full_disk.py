"""A full disk at every write of a run: one line and exit status 2 where the run cannot go on (a
checkpoint, the history, the results, the lock), one warning where it can (the log file, TensorBoard
events), and every file written before still loads.

The failure is planted in the real write paths of a real training run (``tools/cls_train.py`` in a
subprocess): the file object a write goes through is replaced by one whose writes fail with
``ENOSPC`` after a few kilobytes, so ``torch.save`` itself meets the error and wraps it as it does on
a real full disk. The acceptance case, the digits quickstart into a 2 MB tmpfs, runs where the test
machine may mount one (as root).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, one_error_line, patched_tool, run_process
from mdeq.utils.checkpoint import CheckpointWriteError, load_checkpoint, save_checkpoint
from mdeq.utils.event_log import ScalarEvents
from mdeq.utils.logger import LogFileHandler
from mdeq.utils.output_files import OutputWriteError, append_text, copy_file, find_os_error, write_json

DIGITS = str(REPO / "experiments/digits/cls_mdeq_digits.yaml")
TINY = ["PERCENT", "0.06", "TRAIN.BATCH_SIZE_PER_GPU", "16", "TRAIN.END_EPOCH", "2", "TRAIN.PRETRAIN_STEPS", "4",
        "MODEL.F_THRES", "4", "MODEL.B_THRES", "4", "TEST.BATCH_SIZE_PER_GPU", "150"]

# Runs before the tool: the writes into the file named $FULL_FILE (its name, or its temporary file's
# ".tmp-<name>-XXXX") fail with ENOSPC after $FULL_BYTES bytes, from its ($FULL_AFTER + 1)-th opening
# on. Every way a run writes is covered: os.fdopen (replace_file), os.write (appends, the lock),
# logging.FileHandler._open (the log), tensorboardX's open_file (events).
_SHIM = r"""
import errno, logging, os
import tensorboardX.record_writer as _rw
_NAME, _AFTER, _BYTES = os.environ["FULL_FILE"], int(os.environ["FULL_AFTER"]), int(os.environ["FULL_BYTES"])
_opened, _written = {}, {}

def _target(path):
    base = os.path.basename(str(path))
    if base.startswith(".tmp-"):
        base = base[5:].rsplit("-", 1)[0]
    return _NAME in base

def _fails(path):
    _opened[path] = _opened.get(path, 0) + 1
    return _target(path) and sum(n for p, n in _opened.items() if _target(p)) > _AFTER

def _enospc():
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

class _FullFile:
    def __init__(self, f):
        self._f, self._n = f, 0
    def write(self, data):
        if self._n + len(data) > _BYTES:
            self._f.write(data[:max(0, _BYTES - self._n)])
            self._n = _BYTES
            _enospc()
        self._n += len(data)
        return self._f.write(data)
    def __getattr__(self, name):
        return getattr(self._f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.close()

_fdopen = os.fdopen
def fdopen(fd, *a, **k):
    f = _fdopen(fd, *a, **k)
    return _FullFile(f) if _fails(os.readlink(f"/proc/self/fd/{fd}")) else f
os.fdopen = fdopen

_write, _fd_full = os.write, {}
def write(fd, data):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if _target(path) and _fails(path):
        _write(fd, data[:len(data) // 2])
        _enospc()
    return _write(fd, data)
os.write = write

_open_log = logging.FileHandler._open
logging.FileHandler._open = lambda self: (_FullFile(_open_log(self)) if _fails(self.baseFilename)
                                          else _open_log(self))
_open_events = _rw.open_file
_rw.open_file = lambda path: _FullFile(_open_events(path)) if _fails(path) else _open_events(path)
"""


def _train(tmp_path: Path, name: str, after: int, nbytes: int = 4096, *extra: str, expect=None
           ) -> subprocess.CompletedProcess:
    opts = ["--modelDir", tmp_path / "o", "--logDir", tmp_path / "l", *TINY, *extra]
    return run_process([sys.executable, *patched_tool("cls_train.py", _SHIM), "--cfg", DIGITS, *opts], expect=expect,
                       FULL_FILE=name, FULL_AFTER=str(after), FULL_BYTES=str(nbytes))


def _out(tmp_path: Path) -> Path:
    return tmp_path / "o" / "digits" / "cls_mdeq_digits"


def _earlier_files_intact(out: Path) -> None:
    """No temporary file; every checkpoint loads with weights_only=True; every history line parses."""
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp-")]
    for p in out.iterdir():
        if p.name.endswith((".pth.tar", ".pth")):
            load_checkpoint(p)
    if (out / "history.jsonl").exists():
        for line in (out / "history.jsonl").read_text().splitlines():
            json.loads(line)


#: settings under which both epochs are healthy (seeded)
HEALTHY = ["PERCENT", "0.25", "TRAIN.BATCH_SIZE_PER_GPU", "32", "TRAIN.PRETRAIN_STEPS", "12", "MODEL.F_THRES", "6",
           "MODEL.B_THRES", "6"]

# (the file, how many of its writes succeed before the disk is full, bytes written before the
# failure, extra options, what stays)
STOPS = {
    "checkpoint": ("checkpoint.pth.tar", 1, 4096, [], "the previous checkpoint.pth.tar is intact"),
    "epoch copy": ("checkpoint_ep0002.pth.tar", 0, 4096, ["TRAIN.KEEP_CHECKPOINTS", "2"],
                   "no earlier checkpoint_ep0002.pth.tar was there"),
    # the first epoch's best: whether a later epoch beats it depends on the CPU's float sums
    "best": ("model_best.pth.tar", 0, 4096, HEALTHY, "no earlier model_best.pth.tar was there"),
    "final weights": ("final_state.pth", 0, 4096, [], "no earlier final_state.pth was there"),
    "results": ("results.json", 0, 100, [], "no earlier results.json was there"),
    "history": ("history.jsonl", 1, 4096, [], "history.jsonl was cut back to what it held before"),
    "lock": ("run.lock", 0, 4096, [], "no run was started"),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(STOPS))
def test_a_full_disk_stops_the_run_in_one_line_and_keeps_every_earlier_file(kind, tmp_path):
    name, after, nbytes, extra, kept = STOPS[kind]
    proc = _train(tmp_path, name, after, nbytes, *extra)
    out = _out(tmp_path)
    line = one_error_line(proc, "the disk is full", f"cannot write {name} in {out}", "No space left on device",
                           kept)
    assert "TRAIN.RESUME True" in line
    _earlier_files_intact(out)
    if kind == "checkpoint":
        assert load_checkpoint(out / "checkpoint.pth.tar")["epoch"] == 1
    if kind == "history":   # the first epoch's line, and nothing of the second
        assert [json.loads(x)["epoch"] for x in (out / "history.jsonl").read_text().splitlines()] == [0]
    if kind == "lock":
        assert not (out / "run.lock").exists() and not (out / "checkpoint.pth.tar").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name, says", [(".log", "cannot write the log file"),
                                        ("events.out.tfevents", "cannot write TensorBoard events")])
def test_a_log_or_event_file_that_cannot_be_written_is_said_once_and_the_run_goes_on(name, says, tmp_path):
    proc = _train(tmp_path, name, 0, 2048, expect=0)
    text = proc.all  # type: ignore[attr-defined]
    assert "Traceback" not in text and "Logging error" not in text, text[-3000:]
    warnings = [line for line in text.splitlines() if says in line]
    assert len(warnings) == 1 and "No space left on device (ENOSPC)" in warnings[0], text[-3000:]
    out = _out(tmp_path)
    results = json.loads((out / "results.json").read_text())
    assert results["epochs"] == 2
    _earlier_files_intact(out)


@pytest.mark.slow
def test_an_evaluation_that_cannot_write_its_results_says_so_in_one_line(tmp_path):
    _train(tmp_path, "nothing-fails", 0, expect=0)
    model = _out(tmp_path) / "final_state.pth"
    cmd = [sys.executable, *patched_tool("cls_valid.py", _SHIM), "--cfg", DIGITS, "--testModel", model,
           "--modelDir", tmp_path / "v", "--logDir", tmp_path / "l", *TINY]
    proc = run_process(cmd, expect=None, FULL_FILE="valid_results.json", FULL_AFTER="0", FULL_BYTES="100")
    one_error_line(proc, "the disk is full", "cannot write valid_results.json", "no earlier valid_results.json")
    assert not list((tmp_path / "v").rglob(".tmp-*"))


# ------------------------------------------------------------------------ a real small filesystem
@pytest.fixture
def tiny_tmpfs():
    """A 2 MB tmpfs, where this machine lets the test mount one (root, mount allowed)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    where = tempfile.mkdtemp(prefix="mdeq-tmpfs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", where], capture_output=True)
    if mounted.returncode != 0:
        os.rmdir(where)
        pytest.skip(f"this machine does not allow mounting a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield Path(where)
    finally:
        subprocess.run(["umount", where], check=False)
        os.rmdir(where)


@pytest.mark.slow
def test_the_digits_quickstart_into_a_2mb_tmpfs_ends_in_one_line(tiny_tmpfs):
    proc = run_process([sys.executable, "tools/cls_train.py", "--cfg", DIGITS, "OUTPUT_DIR", tiny_tmpfs / "output",
                        "LOG_DIR", tiny_tmpfs / "log"], expect=None)
    out = tiny_tmpfs / "output" / "digits" / "cls_mdeq_digits"
    one_error_line(proc, "the disk is full", str(out), "No space left on device")
    checkpoints = [p for p in out.iterdir() if p.name.endswith((".pth.tar", ".pth"))]
    assert checkpoints
    for p in checkpoints:
        torch.load(p, weights_only=True)
    _earlier_files_intact(out)


# ----------------------------------------------------------------------------- the pieces, in-process
def test_the_os_error_is_found_behind_torchs_wrapper(tmp_path, monkeypatch):
    try:
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 512448 vs 512340")
    except RuntimeError as e:
        assert find_os_error(e).errno == errno.ENOSPC
    assert find_os_error(RuntimeError("write failed: [Errno 122] Disk quota exceeded")).errno == errno.EDQUOT
    bare = RuntimeError("unexpected pos 512448 vs 512340")
    assert find_os_error(bare, str(tmp_path)) is None   # a folder with room: not the disk
    monkeypatch.setattr("mdeq.utils.output_files.free_bytes", lambda folder: 0.0)
    assert find_os_error(bare, str(tmp_path)).errno == errno.ENOSPC


def test_a_failed_append_cuts_the_file_back(tmp_path, monkeypatch):
    path = tmp_path / "history.jsonl"
    append_text(path, '{"epoch": 0}\n')
    real_write = os.write

    def half_then_full(fd, data):
        real_write(fd, data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutputWriteError, match="history.jsonl was cut back"):
        append_text(path, '{"epoch": 1}\n')
    monkeypatch.undo()
    assert path.read_text() == '{"epoch": 0}\n'


def test_a_replaced_file_is_old_or_new_and_no_temporary_is_left(tmp_path, monkeypatch):
    """results.json, a checkpoint and the healthy copy (copy_file) when the disk fails at the fsync."""
    write_json(tmp_path / "results.json", {"top1": 1.0})
    save_checkpoint({"epoch": 1}, tmp_path / "checkpoint.pth.tar")
    copy_file(tmp_path / "checkpoint.pth.tar", tmp_path / "checkpoint_healthy.pth.tar")
    save_checkpoint({"epoch": 2}, tmp_path / "checkpoint.pth.tar")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, os.strerror(errno.EIO))))
    with pytest.raises(OutputWriteError, match=r"cannot write results.json .*Input/output error \(EIO\)"):
        write_json(tmp_path / "results.json", {"top1": 2.0})
    with pytest.raises(CheckpointWriteError, match="the previous checkpoint.pth.tar is intact"):
        save_checkpoint({"epoch": 3}, tmp_path / "checkpoint.pth.tar")
    with pytest.raises(OutputWriteError, match="the previous checkpoint_healthy.pth.tar is intact"):
        copy_file(tmp_path / "checkpoint.pth.tar", tmp_path / "checkpoint_healthy.pth.tar")
    monkeypatch.undo()
    assert json.loads((tmp_path / "results.json").read_text()) == {"top1": 1.0}
    assert load_checkpoint(tmp_path / "checkpoint.pth.tar")["epoch"] == 2
    assert load_checkpoint(tmp_path / "checkpoint_healthy.pth.tar")["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar", "checkpoint_healthy.pth.tar", "results.json"]


class _Full:
    def write(self, *_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    close = flush


def _read_scalars(path: Path) -> list:
    """(tag, step, value) of every scalar in a TensorBoard event file (the TFRecord framing: length,
    its CRC, the Event protobuf, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        n = int.from_bytes(data[at:at + 8], "little")
        event = Event.FromString(data[at + 12:at + 12 + n])
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        at += 12 + n + 4
    return out


def test_tensorboard_events_stop_with_one_warning(tmp_path, caplog):
    events = ScalarEvents(tmp_path / "tb")
    events.add_scalar("train/loss", 0.5, 7)
    events.flush()
    files = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1 and _read_scalars(files[0]) == [("train/loss", 7, 0.5)]
    events._writer._py_recordio_writer._writer = _Full()
    with caplog.at_level(logging.WARNING):
        for step in range(3):
            events.add_scalar("a", 1.0, step)
            events.flush()
        events.close()
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "cannot write TensorBoard events" in caplog.text and "ENOSPC" in caplog.text


def test_the_log_file_is_given_up_with_one_warning(tmp_path, capsys):
    handler = LogFileHandler(tmp_path / "run.log")
    log = logging.getLogger("mdeq.test_full_disk")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("before")
        handler.stream = _Full()
        for _ in range(3):
            log.warning("after")
    finally:
        log.removeHandler(handler)
    err = capsys.readouterr().err
    assert err.count("cannot write the log file") == 1 and "Traceback" not in err and "ENOSPC" in err
    assert handler.failed and "before" in (tmp_path / "run.log").read_text()
