"""Exactly-once work claims on any fsspec URL: numbered attempt files created if absent.

Attempt k of a job is the file ``{claims_url}/{job}.{k:03d}.json``. Taking a job means creating the
next attempt's file with `storage.create_exclusive`: of several watchers racing for the same
attempt exactly one wins, and nothing is ever deleted, so a stale reader can never remove a fresh
claim. A claim holds its owner and an expiry; a newer attempt may be started only when the latest
one has expired (its owner died or gave up), has failed and waited out its retry delay, or belongs
to a dead process on this host (a restarted watcher takes its predecessor's job back at once).

Limits: a claim that outlives its ttl while its owner still works lets a second owner start; the
owner then sees it no longer holds the latest attempt (`is_latest`) and drops its result, so at most
a write in the instant between the check and the write can be duplicated. On filesystems where
`create_exclusive` is not atomic (see its docstring) two watchers can both win one attempt.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Optional

from pipeline import storage

RUNNING, FAILED = "running", "failed"


@dataclass
class Claim:
    job: str
    attempt: int
    owner: str
    host: str
    pid: int
    expires_at: float
    status: str = RUNNING
    error: Optional[str] = None


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ClaimBook:
    """The claims of one folder: who is working on which job, which attempt, until when."""

    def __init__(self, url: str, ttl_s: float, retry_s: float, max_attempts: int, owner: str | None = None) -> None:
        self.url = url
        self.ttl_s = ttl_s
        self.retry_s = retry_s
        self.max_attempts = max_attempts
        self.owner = owner or new_owner_id()

    def _path(self, job: str, attempt: int) -> str:
        return storage.join(self.url, f"{job}.{attempt:03d}.json")

    def attempts(self, job: str) -> list[Claim]:
        """Every attempt recorded for a job, oldest first."""
        pattern = re.compile(re.escape(job) + r"\.(\d{3})\.json$")
        found = sorted((int(m.group(1)), name) for name in storage.listdir(self.url) if (m := pattern.match(name)))
        return [Claim(**storage.read_json(storage.join(self.url, name))) for _, name in found]

    def try_claim(self, job: str) -> Optional[Claim]:
        """Start the next attempt of `job` if nobody holds it; None when busy, exhausted or lost the race."""
        history = self.attempts(job)
        if history:
            last = history[-1]
            if last.attempt >= self.max_attempts and last.status == FAILED:
                return None
            if not self._abandoned(last):
                return None
        attempt = history[-1].attempt + 1 if history else 1
        if attempt > self.max_attempts:
            return None
        claim = Claim(job=job, attempt=attempt, owner=self.owner, host=socket.gethostname(), pid=os.getpid(),
                      expires_at=time.time() + self.ttl_s)
        data = json.dumps(asdict(claim), indent=2).encode()
        return claim if storage.create_exclusive(self._path(job, attempt), data) else None

    def fail(self, claim: Claim, error: str) -> None:
        """Record a failed attempt; the job may be tried again after `retry_s`."""
        claim.status, claim.error = FAILED, error
        claim.expires_at = time.time() + self.retry_s
        storage.write_json(self._path(claim.job, claim.attempt), asdict(claim))

    def is_latest(self, claim: Claim) -> bool:
        """True while nobody has started a newer attempt of the claim's job."""
        return not storage.exists(self._path(claim.job, claim.attempt + 1))

    def gave_up(self, job: str) -> Optional[Claim]:
        """The last failed attempt when every allowed attempt has failed, else None."""
        history = self.attempts(job)
        if history and history[-1].attempt >= self.max_attempts and history[-1].status == FAILED:
            return history[-1]
        return None

    def _abandoned(self, claim: Claim) -> bool:
        if time.time() >= claim.expires_at:
            return True
        return claim.status == RUNNING and claim.host == socket.gethostname() and not _pid_alive(claim.pid)


def latest_attempts(url: str) -> dict[str, Claim]:
    """The newest attempt of every job recorded in a claims folder (what `contrast status` shows)."""
    pattern = re.compile(r"^(.+)\.(\d{3})\.json$")
    newest: dict[str, tuple[int, str]] = {}
    for name in storage.listdir(url):
        if (m := pattern.match(name)) and int(m.group(2)) >= newest.get(m.group(1), (0, ""))[0]:
            newest[m.group(1)] = (int(m.group(2)), name)
    return {job: Claim(**storage.read_json(storage.join(url, name))) for job, (_, name) in sorted(newest.items())}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
