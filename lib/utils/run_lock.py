"""One training run per output folder: ``run.lock`` in the folder names its owner.

A training run takes the lock before it writes anything there (its log file included) and gives
it back when it ends, normally, by an exception or by a stop signal; a second run in the same
folder is refused in one line that names the folder and the owner's pid and host. The lock is an
advisory ``flock`` on the file, which the kernel drops when its process dies however it dies, so a
lock left behind by a killed run (SIGKILL, a crash, a lost node) is taken over with a warning that
names the dead run. Where the file system has no ``flock``, a lock file of a process that is gone
from this host is taken over likewise. Only rank 0 of a distributed run takes the lock; the other
ranks belong to its run and learn its answer (:func:`lock_output_folder`).
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from typing import Any, Dict, List, Optional

from .output_files import OutputDirError, check_writable, write_error
from .distributed import all_gather_object

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"


class OutputLockedError(OutputDirError):
    """Another training run is using the output folder."""


def _read_owner(fd: int) -> Dict[str, Any]:
    """The owner recorded in the open lock file (empty when there is none or it is unreadable)."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 65536).decode("utf-8", "replace")
        owner = json.loads(text) if text.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(owner: Dict[str, Any]) -> str:
    return (f"pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}: "
            f"{owner.get('command', '?')}")


def _alive_here(owner: Dict[str, Any]) -> bool:
    """Whether the owner is a process that still runs on this host (other hosts cannot be asked: yes)."""
    if owner.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(owner.get("pid", -1)), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:   # another user's live process
        return True
    return True


class OutputLock:
    """The lock of the output folder ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        """Take the lock (creating the folder).

        Raises:
            OutputLockedError: a live run holds it.
            OutputDirError: the folder cannot be created or written.
        """
        check_writable(self.folder, "output folder")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                flocked = True
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise OutputLockedError(self._refusal(owner)) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                flocked = False
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:   # not a file its owner removed while this process opened it
                break
            os.close(fd)
        previous = _read_owner(fd)
        if previous and not flocked and _alive_here(previous) and previous.get("pid") != os.getpid():
            os.close(fd)
            raise OutputLockedError(self._refusal(previous))
        if previous:
            logger.warning("taking over the lock %s of a run that ended without giving it back (killed or "
                           "crashed): %s", self.path, _describe(previous))
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)}
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(mine) + "\n").encode())
            os.fsync(fd)
        except OSError as e:   # a full disk: give the lock file back before anything else was written
            os.remove(self.path)
            os.close(fd)
            raise write_error(self.path, e, "no run was started and nothing else was written") from e
        self.fd = fd
        return self

    def _refusal(self, owner: Dict[str, Any]) -> str:
        return (f"the output folder {self.folder} is in use by another training run ({_describe(owner)}); "
                f"wait for it to end, stop it, or give this run another OUTPUT_DIR (--modelDir). The lock is "
                f"{self.path}")

    def release(self) -> None:
        """Give the lock back (removing the file first, so that no run ever sees it held by nobody)."""
        if self.fd is None:
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


_HELD: List[OutputLock] = []


def release_output_locks() -> None:
    """Give back every lock this process took (the tools' exit path; also run at interpreter exit)."""
    while _HELD:
        _HELD.pop().release()


atexit.register(release_output_locks)


def lock_output_folder(folder: str | os.PathLike, is_main: bool) -> None:
    """Take the training lock of ``folder`` on the main process; held until
    :func:`release_output_locks` or the process's end. Call on every rank: a refusal is raised by
    each of them (one collective when distributed).

    Raises:
        OutputLockedError: another run holds the lock.
        OutputDirError: the folder cannot be created or written (main process).
    """
    error: Optional[OutputDirError] = None
    if is_main:
        try:
            _HELD.append(OutputLock(folder).acquire())
        except OutputDirError as e:
            error = e
    refusal = next((r for r in all_gather_object(str(error) if error else "") if r), "")
    if error is not None:
        raise error
    if refusal:
        raise OutputLockedError(refusal)
