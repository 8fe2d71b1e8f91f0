"""TensorBoard scalars, written from the training thread.

tensorboardX's ``SummaryWriter`` writes from a background thread: when the disk fills, that thread
dies with a traceback of its own and the next ``add_scalar`` waits forever on its full queue. The
curves are not worth a run, so :class:`ScalarEvents` writes the same event files synchronously and,
when a write fails, says so once and stops writing them; the run goes on (``history.jsonl`` and the
log keep the figures).
"""
from __future__ import annotations

import logging
import os
import time

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.summary import scalar

from .output_files import describe, find_os_error

logger = logging.getLogger(__name__)


class ScalarEvents:
    """``add_scalar(tag, value, step)`` into ``log_dir/events.out.tfevents.*`` (what TensorBoard reads);
    the file is flushed at most every ``flush_s`` seconds and on :meth:`flush` / :meth:`close`."""

    def __init__(self, log_dir: str | os.PathLike, flush_s: float = 30.0) -> None:
        self.log_dir = os.fspath(log_dir)
        self.flush_s = flush_s
        self._writer = None
        self._flushed = time.time()
        self._guard(self._open)

    def _open(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self._writer = EventsWriter(os.path.join(self.log_dir, "events"))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is None:
            return
        event = Event(wall_time=time.time(), step=int(step), summary=scalar(tag, float(value)))
        self._guard(lambda: self._writer.write_event(event))
        if time.time() - self._flushed > self.flush_s:
            self.flush()

    def flush(self) -> None:
        if self._writer is not None:
            self._guard(self._writer.flush)
            self._flushed = time.time()

    def close(self) -> None:
        if self._writer is not None:
            self._guard(self._writer.close)
            self._writer = None

    def _guard(self, write) -> None:
        """Run ``write``; a failure of the disk ends the curves with one warning."""
        try:
            write()
        except (OSError, RuntimeError) as e:
            cause = find_os_error(e, self.log_dir)
            if cause is None:
                raise
            logger.warning("cannot write TensorBoard events in %s: %s; the run goes on without them (history.jsonl "
                           "and the log keep the figures)", self.log_dir, describe(cause))
            self._writer = None
