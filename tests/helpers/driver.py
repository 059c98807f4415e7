"""`contrast train` as a separate driver process, as users run it, with its output read while it runs."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Optional

import psutil

CONTRAST = str(Path(sys.executable).with_name("contrast"))


class Driver:
    """`contrast ARGS` in a session of its own (a test may signal its whole process group), without
    RAY_AUTH_* variables unless given; its output collected line by line in a thread."""

    def __init__(self, *args: str, env: Optional[dict[str, str]] = None):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
        self.proc = subprocess.Popen([CONTRAST, *args], env={**clean, **(env or {})}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str, timeout_s: float = 300) -> re.Match:
        """The first output line matching `pattern` (a regex), waiting for it; fails with the output's end."""
        deadline = time.monotonic() + timeout_s
        seen = 0
        while time.monotonic() < deadline:
            for line in self.lines[seen:]:
                if m := re.search(pattern, line):
                    return m
            seen = len(self.lines)
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}; output ends:\n{self.output[-4000:]}")

    def finish(self, timeout_s: float = 400) -> int:
        """Wait for the driver to exit (killing its group after `timeout_s`); its exit code."""
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the driver did not finish in {timeout_s:.0f} s:\n{self.output[-4000:]}") from None
        self._reader.join(10)
        return self.proc.returncode

    def tree(self) -> list[int]:
        """Pids of the driver and every process it started (a local Ray's included)."""
        try:
            root = psutil.Process(self.proc.pid)
            return [root.pid] + [c.pid for c in root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def train_workers(self) -> list[int]:
        """Pids of this run's Ray Train worker processes (a local Ray: they are the driver's descendants)."""
        return [p for p in self.tree() if _title(p).startswith("ray::RayTrainWorker")]

    def kill(self) -> None:
        with _gone_ok():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def _title(pid: int) -> str:
    with _gone_ok():
        return " ".join(psutil.Process(pid).cmdline())
    return ""


class _gone_ok:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, tb) -> bool:
        return kind is not None and issubclass(kind, (psutil.NoSuchProcess, ProcessLookupError))


def alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (zombies count as gone)."""
    out = []
    for p in pids:
        with _gone_ok():
            if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def left_after(pids: list[int], timeout_s: float = 15) -> list[int]:
    """Those of `pids` still running after up to `timeout_s` (a stopped run's processes end within it)."""
    deadline = time.monotonic() + timeout_s
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive(pids)


def titles(pids: list[int]) -> list[str]:
    """The command lines of `pids` (for a failure message: which processes were left)."""
    return [f"{p}: {_title(p)[:120]}" for p in pids]


def logged_steps(output: str) -> Counter:
    """How often each training step's console line appears in a driver's output (rank 0 logs every step
    with train.log_every=1): a step done twice appears twice."""
    return Counter(int(m) for m in re.findall(r"(?:pipeline\.train\.metrics|\[rank 0\] train): step (\d+)/", output))
