"""Writing a run's files so that a failed write (full disk, quota, I/O error) ends in one clear error
and damages nothing written before.

* A file that is replaced whole (checkpoints, ``results.json``, pictures) is written to a temporary
  file ``.tmp-<name>-XXXX`` in the same folder, flushed and fsync'ed, then renamed over the target:
  a failure or a crash leaves the target old or new, never partial, and the temporary file is removed.
* An appended file (``history.jsonl``) is cut back to its earlier length when an append fails.
* The operating system's error is found behind whatever wraps it: torch's zip writer turns the
  ``OSError`` of a full disk into ``RuntimeError("... unexpected pos ...")`` with the ``OSError`` as its
  context; where no ``OSError`` is left to find, a folder without free space is taken as the cause.

A failed write raises :class:`OutputWriteError` (an :class:`OutputDirError`, which the tools report as
one line with exit status 2) naming the file, its folder, the reason and what was left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
from typing import Any, BinaryIO, Callable, Optional, Type

#: the space below which a folder counts as full when a wrapped error hides the OSError
_NEARLY_FULL_BYTES = 64 << 10


class OutputDirError(OSError):
    """An output folder that cannot be created or written."""


class OutputWriteError(OutputDirError):
    """Writing one of a run's files failed (disk full, quota, I/O error); earlier files are intact."""


def check_writable(folder: str | os.PathLike, what: str = "output folder") -> None:
    """Create ``folder`` if needed and check that a file can be written in it.

    Raises:
        OutputDirError: naming the folder, the reason and what to do.
    """
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise OutputDirError(f"{what} {os.path.abspath(folder)} cannot be written ({describe(e)}): choose a "
                             f"writable folder (OUTPUT_DIR / --modelDir, LOG_DIR / --logDir) or fix its "
                             f"permissions / free disk space") from e


def find_os_error(err: BaseException, folder: Optional[str] = None) -> Optional[OSError]:
    """The operating system's error behind ``err``: ``err`` itself, its cause or context (at any depth),
    an ``[Errno N]`` in its message, or, failing those and given the ``folder`` written to, a synthetic
    ``ENOSPC`` when that folder has (almost) no free space. None when nothing points at the disk."""
    seen, todo = set(), [err]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        todo += [e.__cause__, e.__context__]
    found = re.search(r"\[Errno (\d+)\]", str(err))
    if found:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    if folder is not None and free_bytes(folder) < _NEARLY_FULL_BYTES:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def free_bytes(folder: str) -> float:
    """Bytes an unprivileged writer may still use in ``folder`` (inf when that cannot be asked)."""
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):
        return float("inf")
    return float(st.f_bavail * st.f_frsize)


def describe(err: OSError) -> str:
    """``"No space left on device (ENOSPC)"``: the reason and its symbol."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno is not None and err.errno in errno.errorcode:
        reason = f"{reason} ({errno.errorcode[err.errno]})"
    return reason


def write_error(path: str, err: OSError, kept: str, cls: Type[OutputWriteError] = OutputWriteError
                ) -> OutputWriteError:
    """The one-line error of a failed write of ``path``: what happened, the file and its folder, the
    reason, ``kept`` (what was left as it was) and what to do."""
    folder = os.path.dirname(os.path.abspath(path))
    lead = {errno.ENOSPC: "the disk is full: ", errno.EDQUOT: "the disk quota is exceeded: "}.get(err.errno, "")
    fix = "free disk space there" if lead else "fix the folder (permissions, the device)"
    out = cls(f"{lead}cannot write {os.path.basename(path)} in {folder}: {describe(err)}; {kept}. Then {fix} "
              f"and run the command again (a training run resumes with TRAIN.RESUME True)")
    out.errno = err.errno
    return out


def _kept_when_replacing(path: str) -> str:
    name = os.path.basename(path)
    before = f"the previous {name} is intact" if os.path.isfile(path) else f"no earlier {name} was there"
    return before + " (the partial file was removed)"


def replace_file(path: str | os.PathLike, write: Callable[[BinaryIO], None],
                 cls: Type[OutputWriteError] = OutputWriteError, pause_s: float = 0.0) -> None:
    """Write ``path`` whole and atomically: ``write(f)`` fills a temporary file in the same folder,
    which is flushed, fsync'ed and renamed over ``path``; ``pause_s`` seconds pass before the rename
    (crash tests).

    Raises:
        OutputWriteError (or ``cls``): the write failed for a reason of the disk; ``path`` is as it
            was and no temporary file is left. Any other error of ``write`` propagates as it is.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    except OSError as e:
        raise write_error(path, e, _kept_when_replacing(path), cls) from e
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp makes 0600 files; use the usual mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if pause_s > 0:
            time.sleep(pause_s)
        os.replace(tmp, path)
    except BaseException as e:
        cause = find_os_error(e, folder) if isinstance(e, (OSError, RuntimeError)) else None  # before the
        _remove_quietly(tmp)                                                 # removal frees the space
        if cause is not None:
            raise write_error(path, cause, _kept_when_replacing(path), cls) from e
        raise
    _fsync_folder(folder)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """:func:`replace_file` with ``data``."""
    replace_file(path, lambda f: f.write(data))


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> None:
    """:func:`replace_file` with ``json.dumps(obj, **dumps)``."""
    write_bytes(path, json.dumps(obj, **dumps).encode())


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to ``path`` (created if absent) and fsync it.

    Raises:
        OutputWriteError: the append failed; the file was cut back to its earlier length.
    """
    path = os.fspath(path)
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as e:
        raise write_error(path, e, f"{os.path.basename(path)} was not changed") from e
    start = os.fstat(fd).st_size
    try:
        done = 0
        while done < len(data):
            done += os.write(fd, data[done:])
        os.fsync(fd)
    except OSError as e:
        try:
            os.ftruncate(fd, start)
            kept = f"{os.path.basename(path)} was cut back to what it held before"
        except OSError:
            kept = f"{os.path.basename(path)} may end in a partial line"
        raise write_error(path, e, kept) from e
    finally:
        os.close(fd)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` over ``dst`` atomically (:func:`replace_file`)."""
    def copy(f: BinaryIO) -> None:
        with open(src, "rb") as s:
            while True:
                block = s.read(1 << 20)
                if not block:
                    return
                f.write(block)
    replace_file(dst, copy)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
