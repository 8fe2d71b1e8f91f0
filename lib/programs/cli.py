"""What the ``tools/*.py`` programs share: known failures become one clear line and an exit status.

Exit statuses:

* 0 — done;
* 2 — bad input, nothing was run or the run stopped before touching earlier output: a config error
  (unknown / mistyped key, a value of the wrong type or out of its range), a missing config file,
  missing or unreadable data (a label image that is not 8-bit label ids), a file that is not a
  checkpoint, a checkpoint that is refused / truncated / of another architecture, an output folder
  that cannot be written or that another training run is using (its lock names the run), more
  processes than devices; also a write of the run's files that failed (disk full, quota, I/O
  error: :class:`~mdeq.utils.output_files.OutputWriteError`), which leaves every earlier file intact;
* 3 — training diverged (``TRAIN.MAX_BAD_STEPS`` consecutive skipped steps), or an epoch failed the
  health check with ``TRAIN.STOP_ON_UNHEALTHY``; the message names the last checkpoint from before
  the trouble;
* 128 + signal number (143 for SIGTERM, 130 for SIGINT) — stopped by a signal after saving a
  checkpoint; the message says how to resume.

Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import logging
import signal
import sys
from typing import Any, Callable, Optional, Sequence

from ..config.loader import ConfigError
from ..datasets.common import DatasetError
from ..utils.checkpoint import CheckpointError
from ..utils.output_files import OutputDirError
from ..utils.distributed import DeviceError
from ..utils.run_lock import release_output_locks
from ..core.signals import TrainingInterrupted
from ..core.step_guard import TrainingDiverged

logger = logging.getLogger("mdeq")

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3

#: exceptions that mean "the input is wrong" (or the output cannot be written): reported as one line,
#: exit status 2. OutputDirError covers OutputWriteError (and CheckpointWriteError).
BAD_INPUT = (ConfigError, FileNotFoundError, CheckpointError, DatasetError, OutputDirError, DeviceError)


def one_line(err: BaseException) -> str:
    """The message of ``err`` without a DataLoader worker's traceback (its last line is the message)."""
    text = str(err).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def _report(msg: str) -> None:
    if not logging.getLogger().handlers:  # failed before create_logger: log to stderr
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s: %(message)s")
    logger.error("%s", msg)


def run_tool(main: Callable[[Optional[Sequence[str]]], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run ``main(argv)``; return the exit status (see the module docstring) after logging one line.
    The output folder's lock of a training run (:mod:`mdeq.utils.run_lock`) is given back however
    ``main`` ends."""
    try:
        main(argv)
        return 0
    except BAD_INPUT as e:
        _report(f"error: {type(e).__name__}: {one_line(e)}")
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        _report(f"error: {one_line(e)}")
        return EXIT_DIVERGED
    except TrainingInterrupted as e:
        return 128 + e.signum  # the runner logged how to resume
    except KeyboardInterrupt as e:
        _report(f"abandoned ({e or 'interrupted'}): the last checkpoint written stays intact; resume with "
                f"TRAIN.RESUME True")
        return 128 + signal.SIGINT
    finally:
        release_output_locks()   # a tool called in-process (tests) gives its folder back at once


def tool_main(main: Callable[[Optional[Sequence[str]]], Any]) -> None:
    """``sys.exit(run_tool(main))`` for the ``if __name__ == '__main__'`` blocks."""
    sys.exit(run_tool(main))
