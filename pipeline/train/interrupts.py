"""Why a run stops or pauses between two steps, agreed by every rank, and the messages that carry it.

Three things interrupt training, each at a step boundary so that nothing is lost:

* a non-finite loss or gradient norm on any rank: every rank stops at that step, which is never
  checkpointed (`NonFiniteError`);
* a stop request: SIGTERM (Slurm, Kubernetes) or SIGINT to a worker process, or the driver's request
  when it got the signal itself (`request_stop`, through Ray's key-value store). Every rank checkpoints
  the step it just finished and returns; the driver reads which signal and where (`stopped_at`);
* a preemption notice: Ray Core marks a node of the group as draining (`ray.train.get_preemption_info`).
  Every rank checkpoints the step it just finished and waits (`wait_for_restart`) for Ray Train to
  restart the group without that node, from that checkpoint: no step is done twice.

One all-reduce per step carries the local verdicts (`Boundary.check`); the preemption poll, itself a
collective of Ray's, runs only at steps where rank 0 asks for it (at most every `NOTICE_POLL_S`).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from pipeline.distributed import all_reduce_max, get_rank
from pipeline.log import get_logger

log = get_logger(__name__)

NOTICE_POLL_S = 1.0           # rank 0 asks every rank to read Ray's preemption notice at most this often
STOP_POLL_S = 1.0             # rank 0 reads the driver's stop request at most this often
PAST_DEADLINE_S = 60.0        # a preempted group still alive this long after the deadline trains on
DEFAULT_NOTICE_S = 120.0      # Ray Train's own wait when a drain gives no deadline

_signalled: list[int] = []    # the signals this worker process received while training
_previous: dict[int, Any] = {}  # Ray's own handlers, for signals that come when no training runs
_training = threading.Event()


class NonFiniteError(RuntimeError):
    """The loss or the gradient norm of a step is NaN or infinite: the run stops at that step."""


# ------------------------------------------------------------------------------------ signals
def install_signal_handlers() -> None:
    """In a worker process's main thread: while `training()`, the first SIGTERM or SIGINT asks for a
    checkpoint at the next step boundary and a clean stop, and a second one ends the process at once;
    outside it (Ray stopping its worker) Ray's own handler runs."""
    for s in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(s)
        if current is not _record:                # installed twice: keep the handler from before
            _previous[s] = current
        signal.signal(s, _record)


def pending_signal() -> int:
    """The first signal this worker received while training (a stop request), else 0."""
    return _signalled[0] if _signalled else 0


@contextlib.contextmanager
def training() -> Iterator[None]:
    """The span in which a signal to this worker is a stop request (the train loop)."""
    _signalled.clear()
    _training.set()
    try:
        yield
    finally:
        _training.clear()


def _record(signum: int, frame: Any) -> None:
    if not _training.is_set():
        return _delegate(signum, frame)
    if _signalled:
        os.write(2, f"contrast worker: {signal.Signals(signum).name} again: stopping now\n".encode())
        os._exit(128 + signum)
    _signalled.append(signum)
    os.write(2, f"contrast worker: {signal.Signals(signum).name}: checkpointing at the next step, then "
                f"stopping (again: at once)\n".encode())


def _delegate(signum: int, frame: Any) -> None:
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:              # the default action: end the process
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


# ------------------------------------------------------------------- the driver ↔ workers keys
def _key(kind: str, run_dir: str) -> bytes:
    return f"contrast/{kind}/{run_dir}".encode()


def _kv() -> Any:
    from ray.experimental import internal_kv
    return internal_kv if internal_kv._internal_kv_initialized() else None


def request_stop(run_dir: str, signum: int) -> None:
    """The driver asks the workers of `run_dir` to checkpoint at their next step and stop."""
    _kv()._internal_kv_put(_key("stop", run_dir), str(signum).encode(), overwrite=True)


def clear(run_dir: str) -> None:
    """Forget an earlier run's stop request and answer (a Ray cluster outlives its drivers)."""
    kv = _kv()
    for kind in ("stop", "stopped"):
        if kv is not None:
            kv._internal_kv_del(_key(kind, run_dir))


def stopped_at(run_dir: str) -> Optional[tuple[int, int]]:
    """(signal, step) when the workers stopped on a stop request after checkpointing that step, else None."""
    kv = _kv()
    value = kv._internal_kv_get(_key("stopped", run_dir)) if kv is not None else None
    if not value:
        return None
    signum, step = value.decode().split()
    return int(signum), int(step)


def _stop_requested(run_dir: str) -> int:
    kv = _kv()
    value = kv._internal_kv_get(_key("stop", run_dir)) if kv is not None else None
    return int(value) if value else 0


def report_stopped(run_dir: str, signum: int, step: int) -> None:
    kv = _kv()
    if kv is not None:
        kv._internal_kv_put(_key("stopped", run_dir), f"{signum} {step}".encode(), overwrite=True)


# -------------------------------------------------------------------------------- the boundary
@dataclass
class Verdict:
    """What every rank does after a step: `stop` (the signal number) or `notice` (Ray's PreemptionInfo)."""
    stop: int = 0
    notice: Any = None

    def __bool__(self) -> bool:
        return bool(self.stop or self.notice)


class Boundary:
    """The agreed verdict of each step boundary of one worker (see the module docstring)."""

    def __init__(self, run_dir: str, notices: bool = True):
        """`notices`: poll Ray Train's preemption notices (only inside a Ray Train worker)."""
        self.run_dir, self.notices = run_dir, notices
        self._polled = {"stop": 0.0, "notice": 0.0}
        self._noticed: Any = None                     # the notice already acted on (Ray repeats it until the end)

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """One all-reduce of (not finite, stop signal, poll the notice); raises `NonFiniteError`. Collective."""
        bad = not (math.isfinite(loss) and math.isfinite(grad_norm))
        flags = torch.tensor([float(bad), float(self._local_stop()), float(self._poll_due())])
        bad_any, signum, poll = (int(v) for v in all_reduce_max(flags).tolist())
        if bad_any:
            raise NonFiniteError(
                f"step {step}: the loss or the gradient norm is not finite (on rank {get_rank()}: loss {loss}, "
                f"gradient norm {grad_norm}); stopped without checkpointing this step. The newest checkpoint is "
                "the last good one: lower train.lr (or raise train.warmup_steps), check the data, then rerun to "
                "resume from it")
        notice = self._notice() if poll else None
        if notice is not None and notice == self._noticed:
            notice = None
        self._noticed = notice or self._noticed
        return Verdict(stop=signum, notice=notice)

    def _local_stop(self) -> int:
        if signum := pending_signal():
            return signum
        if get_rank() == 0 and self._due("stop", STOP_POLL_S):
            return _stop_requested(self.run_dir)
        return 0

    def _poll_due(self) -> bool:
        return self.notices and get_rank() == 0 and self._due("notice", NOTICE_POLL_S)

    def _due(self, what: str, every_s: float) -> bool:
        now = time.monotonic()
        if now - self._polled[what] < every_s:
            return False
        self._polled[what] = now
        return True

    @staticmethod
    def _notice() -> Any:
        import ray.train
        return ray.train.get_preemption_info()          # a collective of Ray's: every rank calls it here


def wait_for_restart(notice: Any, step: int) -> None:
    """After the checkpoint of `step`: wait for Ray Train to replace this group (it does at the notice's
    deadline). Were it still alive well past the deadline (the node was not taken after all), train on."""
    deadline = notice.deadline_ms / 1000 if notice.deadline_ms else time.time() + DEFAULT_NOTICE_S
    log.warning("preemption notice for node(s) %s (ranks %s): checkpointed step %d; waiting for Ray Train to "
                "restart the group without them (deadline in %.0f s)", ", ".join(notice.preempted_node_ids),
                notice.preempted_ranks, step, deadline - time.time())
    _training.clear()                              # Ray tearing the group down may signal: its handler runs
    while time.time() < deadline + PAST_DEADLINE_S:
        time.sleep(0.5)
    _training.set()
    log.warning("still running %.0f s after the preemption deadline: training on", PAST_DEADLINE_S)
