"""What a run says about itself while it trains, as artifacts any reader can open (local or on S3):

- ``progress.json``, rewritten by rank 0 at every logged step: the step, loss, throughput, ETA and the
  samples read per data source;
- ``events/{ms}-{kind}.json``, one small file per event (an attempt started or resumed, a failure, a
  stop, the data's end, the last step), never rewritten: an object store cannot append, and readers see
  each event whole or not at all.

`contrast status` reads them (with the checkpoints, the lease and the eval results); nothing else does.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from typing import Any, Optional

from pipeline import storage
from pipeline.layout import events_dir, progress_url
from pipeline.log import get_logger

log = get_logger(__name__)

STARTED, FAILED, STOPPED, DATA_ENDED, FINISHED = "started", "failed", "stopped", "data-ended", "finished"


class Eta:
    """Seconds left to `total` steps: at the pace since this attempt's first logged step (start-up is not
    counted; checkpoints and evaluations beside training are), or the last window's before there is one."""

    def __init__(self, total: int):
        self.total = total
        self._first: Optional[tuple[float, int]] = None

    def seconds(self, step: int, step_time_s: float) -> float:
        now, left = time.monotonic(), max(self.total - step, 0)
        if self._first is None or step <= self._first[1]:
            self._first = self._first or (now, step)
            return step_time_s * left
        t0, s0 = self._first
        return (now - t0) / (step - s0) * left


def format_duration(seconds: float) -> str:
    """`1:02:03`, `4:05`: hours only when there are some."""
    s = int(round(max(seconds, 0)))
    h, rest = divmod(s, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def write_progress(run_dir: str, record: dict[str, Any]) -> None:
    """Rank 0's newest logged step (best effort: a failed write is logged, training goes on)."""
    try:
        storage.write_json(progress_url(run_dir), {**record, "time": time.time()})
    except Exception as e:                             # a status file never stops a run
        log.warning("could not write %s: %s: %s", progress_url(run_dir), type(e).__name__, e)


def read_progress(run_dir: str) -> Optional[dict[str, Any]]:
    url = progress_url(run_dir)
    return storage.read_json(url) if storage.exists(url) else None


def record_event(run_dir: str, kind: str, **fields: Any) -> None:
    """One event of the run, in a file of its own (best effort, like `write_progress`)."""
    now = time.time()
    name = f"{int(now * 1000):013d}-{kind}-{uuid.uuid4().hex[:6]}.json"
    event = {"kind": kind, "time": now, "host": socket.gethostname(), "pid": os.getpid(), **fields}
    try:
        storage.write_json(storage.join(events_dir(run_dir), name), event)
    except Exception as e:
        log.warning("could not record the %s event in %s: %s: %s", kind, run_dir, type(e).__name__, e)


def read_events(run_dir: str) -> list[dict[str, Any]]:
    """Every event of the run, oldest first."""
    url = events_dir(run_dir)
    return [storage.read_json(storage.join(url, name)) for name in storage.listdir(url) if name.endswith(".json")]
