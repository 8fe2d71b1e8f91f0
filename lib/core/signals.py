"""Stop signals: SIGTERM / SIGINT (a cluster's pre-emption, Ctrl-C) end training at the next step
boundary, after which the trainer saves a checkpoint and exits with :class:`TrainingInterrupted`."""
from __future__ import annotations

import shlex
import signal
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence

from ..utils.distributed import all_reduce_sum, is_initialized


class TrainingInterrupted(RuntimeError):
    """SIGTERM / SIGINT stopped the run after a checkpoint was saved; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.signum = int(signum)


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is set on any process (so that every rank takes the same branch)."""
    if not is_initialized():
        return bool(flag)
    return all_reduce_sum(float(bool(flag))) > 0


class GracefulStop:
    """Context manager: SIGTERM / SIGINT ask the training loop to stop at the next step boundary.

    The first signal only sets a flag (the current step finishes, a checkpoint is saved, the program
    exits non-zero saying how to resume). A second signal abandons at once (``KeyboardInterrupt``);
    the atomic writes leave the previous checkpoint intact. Handlers are installed only in the main
    thread and restored on exit.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        self.signals = tuple(signals)
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum  # no logging here: the handler may run inside a logging call
            return
        raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: abandoned")

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    @property
    def name(self) -> str:
        """The name of the signal received (``'SIGTERM'``), or ``''``."""
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def requested(self) -> bool:
        """Whether this process received a stop signal."""
        return self.signum is not None

    def should_stop(self) -> bool:
        """Whether any process received a stop signal (a collective when distributed: call it on
        every rank at the same step)."""
        stop = any_rank(self.requested())
        if stop and self.signum is None:
            self.signum = signal.SIGTERM  # another rank was signalled
        return stop


def resume_command(argv: Optional[Sequence[str]] = None) -> str:
    """The command line that resumes this run: the same one with ``TRAIN.RESUME True``."""
    args = list(sys.argv if argv is None else argv)
    out: List[str] = []
    i = 0
    while i < len(args):
        if args[i] == "TRAIN.RESUME" and i + 1 < len(args):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return "python " + " ".join(shlex.quote(a) for a in out) + " TRAIN.RESUME True"
