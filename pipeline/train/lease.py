"""One writer per run_dir: a lease with a heartbeat, created atomically, on local disk and on S3.

Two drivers training into the same run_dir would overwrite each other's checkpoints, TensorBoard files
and Ray Train records. A driver holds `run_dir/lease/{generation:08d}.json` (host, pid, start time,
the last renewal) while it trains and renews it every `ttl_s / 4`. Taking the lease creates the next
generation's file with an exclusive create (a hard link locally, a conditional PUT `If-None-Match: *`
on S3, `storage.create_exclusive`), so of two drivers racing for it exactly one gets it. A lease not
renewed for `cluster.lease_ttl_s` belongs to a driver that died (SIGKILL, a lost machine): the next
driver takes it over by creating the next generation; its holder, were it alive after all, sees the
newer generation at its next renewal and stops. Renewal times are the hosts' wall clocks: they must
agree to well within the ttl. A holder that ran in this very machine and pid namespace (same boot id and
namespace) and whose process is gone is known dead at once: a rerun after a SIGKILL need not wait the ttl.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

import psutil

from pipeline import storage
from pipeline.layout import lease_dir, lease_file, parse_lease_file
from pipeline.log import get_logger
from pipeline.train.integrity import dumps

log = get_logger(__name__)


class LeaseHeld(RuntimeError):
    """Another driver is training into this run_dir; the message names it."""


@dataclass
class Holder:
    """Who holds a lease: what a refused driver is told."""
    host: str
    pid: int
    started: str                  # ISO time, UTC
    renewed: float                # Unix time of the last renewal
    ttl_s: float
    command: str
    machine: Optional[str] = None  # boot id and pid namespace (`this_machine`); None: unknown

    def age_s(self) -> float:
        return time.time() - self.renewed

    def alive(self) -> bool:
        return self.age_s() < self.ttl_s and not self.gone()

    def gone(self) -> bool:
        """Its process is known to have ended: it ran here (same machine and pid namespace) and its pid is
        free, or taken by a process started after the lease was (a reused pid)."""
        if self.machine is None or self.machine != this_machine():
            return False
        try:
            created = psutil.Process(self.pid).create_time()
        except psutil.NoSuchProcess:
            return True
        return created > datetime.datetime.fromisoformat(self.started).timestamp() + 1.0

    def describe(self) -> str:
        return (f"{self.command} on host {self.host}, pid {self.pid}, started {self.started}, lease renewed "
                f"{self.age_s():.0f} s ago")


class Lease:
    """The lease on `run_dir` for this process (see the module docstring)."""

    def __init__(self, run_dir: str, ttl_s: float, command: str):
        self.dir, self.ttl_s = lease_dir(run_dir), ttl_s
        self.run_dir = run_dir
        self.me = Holder(socket.gethostname(), os.getpid(),
                         datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), 0.0, ttl_s,
                         command, this_machine())
        self.generation: Optional[int] = None
        self.lost: Optional[str] = None           # set when another driver took the lease over
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> None:
        """Take the lease or raise `LeaseHeld` naming its holder; a stale one is taken over (logged)."""
        newest = current(self.run_dir)
        if newest is not None:
            generation, holder = newest
            if holder is not None and holder.alive():
                raise LeaseHeld(f"run_dir {self.run_dir} is being trained by {holder.describe()}: two trainers "
                                "would overwrite each other's checkpoints. Wait for it to finish, stop it, or use "
                                f"another run_dir (a lease not renewed for cluster.lease_ttl_s = {holder.ttl_s:g} s "
                                "is taken over)")
            was = holder.describe() if holder is not None else "an unreadable lease"
            why = "its process has ended" if holder is not None and holder.gone() else "not renewed within its ttl"
            log.warning("taking over the run_dir lease of %s: %s", was, why)
        generation = (newest[0] if newest else 0) + 1
        self.me.renewed = time.time()
        if not storage.create_exclusive(self._url(generation), dumps(asdict(self.me))):
            other = current(self.run_dir)
            raise LeaseHeld(f"run_dir {self.run_dir}: another driver took the lease at the same moment "
                            f"({other[1].describe() if other and other[1] else 'unknown'})")
        self.generation = generation
        for name in storage.listdir(self.dir):
            older = parse_lease_file(name)
            if older is not None and older < generation:
                storage.remove(storage.join(self.dir, name))
        self._thread = threading.Thread(target=self._heartbeat, name="contrast-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop renewing and remove the lease (unless another driver took it over)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.generation is not None and not self.lost:
            storage.remove(self._url(self.generation))

    def _url(self, generation: int) -> str:
        return storage.join(self.dir, lease_file(generation))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self.renew()
            except Exception as e:                 # storage hiccup: the next beat tries again
                log.warning("could not renew the run_dir lease %s: %s", self._url(self.generation), e)
            if self.lost:
                return

    def renew(self) -> None:
        """Write a fresh renewal time, unless a newer generation shows that the lease was taken over."""
        newest = current(self.run_dir)
        if newest is not None and newest[0] > self.generation:
            self.lost = newest[1].describe() if newest[1] else f"generation {newest[0]}"
            log.error("the run_dir lease of %s was taken over by %s", self.run_dir, self.lost)
            return
        self.me.renewed = time.time()
        storage.write_bytes(self._url(self.generation), dumps(asdict(self.me)))


def this_machine() -> Optional[str]:
    """This kernel's boot id and this process's pid namespace: equal only for processes that see each other's
    pids. None where Linux's /proc does not say (then only the ttl tells a dead holder)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def current(run_dir: str) -> Optional[tuple[int, Optional[Holder]]]:
    """The newest lease generation of `run_dir` and its holder (None when unreadable), or None."""
    generations = sorted(g for name in storage.listdir(lease_dir(run_dir))
                         if (g := parse_lease_file(name)) is not None)
    if not generations:
        return None
    try:
        holder = Holder(**storage.read_json(storage.join(lease_dir(run_dir), lease_file(generations[-1]))))
    except (FileNotFoundError, ValueError, TypeError):
        holder = None                              # being replaced, or damaged: treated as stale
    return generations[-1], holder


def holder(run_dir: str) -> Optional[Holder]:
    """Who holds (or last held) the lease of `run_dir`, or None."""
    newest = current(run_dir)
    return newest[1] if newest else None


_held: dict[str, Lease] = {}


@contextlib.contextmanager
def hold(run_dir: str, ttl_s: float, command: str) -> Iterator[Lease]:
    """The lease on `run_dir` for the duration of the block. Re-entrant in one process (`contrast run`
    holds it around data, training and evaluation; training inside asks again)."""
    if run_dir in _held:
        yield _held[run_dir]
        return
    lease = Lease(run_dir, ttl_s, command)
    lease.acquire()
    _held[run_dir] = lease
    try:
        yield lease
    finally:
        del _held[run_dir]
        lease.release()
