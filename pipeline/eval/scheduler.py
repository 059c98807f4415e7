"""The evaluation scheduler: evaluate each complete published checkpoint exactly once, on a policy.

A `Watcher` looks at ``run_dir/published/step_N/`` folders that carry ``COMPLETE`` (a folder without
it does not exist for us), picks the ones the policy wants and that have no result
``run_dir/eval/step_N.json`` yet, claims each (`ClaimBook`: one winner among any number of
watchers, across restarts) and evaluates it. Failures are logged, recorded in the claim and retried
after ``eval.retry_s``, up to ``eval.max_attempts``; they never propagate to the caller.

Policies (``eval.schedule``): ``every`` evaluates every ``eval.every_k``-th published checkpoint
(by publication order); ``latest`` evaluates only the newest one, skipping stale ones when
evaluation falls behind; ``off`` evaluates nothing. Draining (end of training) also evaluates the
last checkpoint whatever the policy, so a run always ends with a final result.

`start_eval_actor(cfg)` runs a Watcher in a Ray actor with its own CPUs beside training.
"""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from pipeline import storage
from pipeline.config import Config, config_from_dict
from pipeline.eval.claims import ClaimBook
from pipeline.eval.evaluate import evaluate_checkpoint, write_result
from pipeline.layout import claims_dir, eval_result_url, parse_step, published_root, published_url, step_name
from pipeline.log import get_logger, setup_logging
from pipeline.models.published import read_manifest

log = get_logger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    url: str

    @property
    def name(self) -> str:
        return step_name(self.step)


def published_checkpoints(run_dir: str) -> list[Checkpoint]:
    """The complete published checkpoints of a run, oldest first."""
    steps = (parse_step(name) for name in storage.complete_subdirs(published_root(run_dir)))
    return [Checkpoint(step, published_url(run_dir, step)) for step in sorted(s for s in steps if s is not None)]


def select(checkpoints: list[Checkpoint], schedule: str, every_k: int, final: bool) -> list[Checkpoint]:
    """The checkpoints a policy wants evaluated (done or not), oldest first."""
    if schedule == "off" or not checkpoints:
        chosen = []
    elif schedule == "latest":
        chosen = [checkpoints[-1]]
    elif schedule == "every":
        chosen = [c for i, c in enumerate(checkpoints, start=1) if i % every_k == 0]
    else:
        raise ValueError(f"eval.schedule = {schedule!r}: expected off, every or latest")
    if final and checkpoints and checkpoints[-1] not in chosen:
        chosen.append(checkpoints[-1])
    return chosen


@dataclass
class Outcome:
    """What one watcher did: the steps it evaluated and the errors it met (step → message)."""
    evaluated: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)


class Watcher:
    """Evaluates a run's published checkpoints following `cfg.eval`; safe to run several at once."""

    def __init__(self, run_dir: str, cfg: Config) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        e = cfg.eval
        self.claims = ClaimBook(claims_dir(run_dir), e.claim_ttl_s, e.retry_s, e.max_attempts)
        self.outcome = Outcome()
        self._reported_gave_up: set[int] = set()

    def pending(self, final: bool = False) -> list[Checkpoint]:
        """Checkpoints the policy wants that have no result yet."""
        chosen = select(published_checkpoints(self.run_dir), self.cfg.eval.schedule, self.cfg.eval.every_k, final)
        return [c for c in chosen if not storage.exists(eval_result_url(self.run_dir, c.step))]

    def poll(self, final: bool = False) -> list[int]:
        """One pass: claim and evaluate what is pending (newest first under `latest`); the steps done."""
        todo = self.pending(final)
        if self.cfg.eval.schedule == "latest":
            todo.reverse()
        done = []
        for ckpt in todo:
            if self._evaluate_claimed(ckpt):
                done.append(ckpt.step)
        return done

    def run(self, stop: threading.Event) -> None:
        """Poll every `eval.poll_s` seconds until `stop` is set; errors are logged, never raised."""
        while not stop.is_set():
            try:
                self.poll()
            except Exception as e:                      # a listing error must not kill the watcher
                log.error("eval watcher pass over %s failed: %s: %s", self.run_dir, type(e).__name__, e)
            stop.wait(self.cfg.eval.poll_s)

    def drain(self) -> Outcome:
        """A last pass that also takes the final checkpoint; returns everything this watcher did."""
        try:
            self.poll(final=True)
        except Exception as e:
            log.error("final eval pass over %s failed: %s: %s", self.run_dir, type(e).__name__, e)
        return self.outcome

    def _evaluate_claimed(self, ckpt: Checkpoint) -> bool:
        claim = self.claims.try_claim(ckpt.name)
        if claim is None:
            self._report_gave_up(ckpt)
            return False
        if storage.exists(eval_result_url(self.run_dir, ckpt.step)):   # finished by someone while we claimed
            return False
        log.debug("evaluating %s (attempt %d)", ckpt.url, claim.attempt)
        try:
            result = evaluate_checkpoint(ckpt.url, self.cfg)
        except Exception as e:
            message = f"{type(e).__name__}: {e}"
            then = (f"retried in {self.cfg.eval.retry_s:.0f} s" if claim.attempt < self.cfg.eval.max_attempts
                    else "no attempts left")
            log.error("evaluation of %s failed (attempt %d of %d, %s): %s", ckpt.url, claim.attempt,
                      self.cfg.eval.max_attempts, then, message)
            self.claims.fail(claim, message)
            self.outcome.failed[ckpt.step] = message
            return False
        if not self.claims.is_latest(claim):
            log.warning("%s: evaluation outlived its claim (eval.claim_ttl_s = %.0f s) and was taken over; "
                        "dropping this result", ckpt.name, self.cfg.eval.claim_ttl_s)
            return False
        result.update(attempt=claim.attempt, evaluated_by=claim.owner)
        write_result(self.run_dir, result)
        self.outcome.evaluated.append(ckpt.step)
        self.outcome.failed.pop(ckpt.step, None)
        return True

    def _report_gave_up(self, ckpt: Checkpoint) -> None:
        last = self.claims.gave_up(ckpt.name)
        if last is not None and ckpt.step not in self._reported_gave_up:
            self._reported_gave_up.add(ckpt.step)
            log.error("giving up on %s after %d failed evaluations; last error: %s", ckpt.url, last.attempt, last.error)


def watch(run_dir: str, cfg: Optional[Config] = None, once: bool = False,
          stop: Optional[threading.Event] = None, overrides: Sequence[str] = ()) -> Outcome:
    """`contrast watch`: evaluate new checkpoints until interrupted (or one pass with `once`).

    Without `cfg`, the run config stored in the newest published checkpoint is used, with `overrides`
    (waiting for the first checkpoint to appear unless `once`). Watching explicitly means evaluating:
    a run trained with `eval.schedule: off` is evaluated with `every`.
    """
    stop = stop or threading.Event()
    while cfg is None:
        checkpoints = published_checkpoints(run_dir)
        if checkpoints:
            cfg = config_from_dict(read_manifest(checkpoints[-1].url)["config"], origin=f"{checkpoints[-1].url}",
                                   overrides=overrides)
        elif once:
            log.info("no published checkpoint in %s yet: nothing to evaluate", run_dir)
            return Outcome()
        else:
            stop.wait(Config().eval.poll_s)
    if cfg.eval.schedule == "off":
        log.info("eval.schedule is off for this run; an explicit watch evaluates every checkpoint (eval.schedule="
                 "every; set eval.schedule=latest to take only the newest)")
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, schedule="every"))
    watcher = Watcher(run_dir, cfg)
    if once:
        watcher.poll()
    else:
        log.info("watching %s (schedule %s, every %d s); Ctrl-C to stop", run_dir, cfg.eval.schedule, cfg.eval.poll_s)
        watcher.run(stop)
    return watcher.outcome


# ------------------------------------------------------------------------------------ Ray actor
class _EvalActor:
    """A Watcher polling in a thread of its own process; `finish` stops it and drains."""

    def __init__(self, cfg_dict: dict[str, Any]) -> None:
        import torch
        self.cfg = config_from_dict(cfg_dict, origin="eval actor")
        setup_logging(self.cfg.logging.level)
        torch.set_num_threads(max(1, int(self.cfg.eval.cpus)))
        self.watcher = Watcher(self.cfg.run_dir, self.cfg)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.watcher.run, args=(self.stop,), name="eval-watcher", daemon=True)
        self.thread.start()

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        self.thread.join()
        outcome = self.watcher.drain()
        return {"evaluated": outcome.evaluated, "failed": outcome.failed}


class EvalActorHandle:
    """What `start_eval_actor` returns: `finish(timeout_s)` drains the last checkpoint, then stops."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def finish(self, timeout_s: Optional[float] = None) -> dict[str, Any]:
        """Wait for the evaluation of what is left (at most `timeout_s`), then stop the actor.

        Returns {"evaluated": [steps], "failed": {step: error}}; on a timeout or a dead actor the
        problem is logged and what is known is returned, the caller never gets an exception.
        """
        import ray
        try:
            return ray.get(self.actor.finish.remote(), timeout=timeout_s)
        except Exception as e:
            log.error("the eval actor did not finish cleanly: %s: %s; unevaluated checkpoints stay pending for "
                      "`contrast watch`", type(e).__name__, e)
            return {"evaluated": [], "failed": {}, "error": f"{type(e).__name__}: {e}"}
        finally:
            ray.kill(self.actor)

    def stop(self) -> None:
        """End the actor at once, evaluating nothing more (training failed or was interrupted)."""
        import ray
        ray.kill(self.actor)


def start_eval_actor(cfg: Config) -> EvalActorHandle:
    """Start the scheduled evaluation beside training (Ray already initialised by the caller).

    The actor asks for `eval.cpus` CPUs of its own, so it never takes a training worker's slot.
    """
    import ray
    actor_cls = ray.remote(num_cpus=cfg.eval.cpus, max_concurrency=2)(_EvalActor)
    actor = actor_cls.remote(cfg.to_dict())
    log.info("evaluating beside training (schedule %s, %g CPUs): %s", cfg.eval.schedule, cfg.eval.cpus, cfg.run_dir)
    return EvalActorHandle(actor)
