"""`contrast status RUN_DIR`: where a run stands, read from its artifacts only (local or any fsspec URL).

It needs no Ray, no driver and no access to the machines that train: who holds the lease, the newest
`progress.json`, the resume checkpoints and the published ones, the eval results and failed eval claims,
and the events (starts, resumes, failures, stops) are all files in the run_dir.
"""
from __future__ import annotations

import datetime
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from pipeline import storage
from pipeline.eval.claims import FAILED as CLAIM_FAILED
from pipeline.eval.claims import latest_attempts
from pipeline.eval.evaluate import HEADLINE
from pipeline.eval.report import read_results
from pipeline.eval.scheduler import published_checkpoints
from pipeline.layout import claims_dir, parse_step
from pipeline.train import progress as events
from pipeline.train.checkpoint import checkpoint_statuses
from pipeline.train.lease import holder as lease_holder
from pipeline.train.progress import format_duration, read_events, read_progress


@dataclass
class RunStatus:
    """Everything `contrast status` shows, as plain data (`--json` prints it as it is)."""
    run_dir: str
    trainer: Optional[dict[str, Any]]          # the lease holder: host, pid, command, alive, renewed_s_ago
    progress: Optional[dict[str, Any]]         # progress.json, with its age and the ETA counted from now
    checkpoints: list[dict[str, Any]]          # step, state, detail (resume checkpoints, ascending)
    published: list[int]                       # steps with complete published weights
    evaluated: dict[int, dict[str, float]]     # step -> its headline metrics
    eval_failures: dict[int, dict[str, Any]]   # step -> the failed attempt: attempt, error
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def resume_step(self) -> Optional[int]:
        complete = [c["step"] for c in self.checkpoints if c["state"] == "complete"]
        return complete[-1] if complete else None


def run_status(run_dir: str) -> RunStatus:
    """Read `run_dir`'s artifacts; raises FileNotFoundError when it holds none of a run's."""
    if not storage.exists(run_dir):
        raise FileNotFoundError(f"run_dir {run_dir} does not exist")
    holder = lease_holder(run_dir)
    trainer = None if holder is None else {
        "host": holder.host, "pid": holder.pid, "command": holder.command, "started": holder.started,
        "alive": holder.alive(), "renewed_s_ago": round(holder.age_s(), 1)}
    return RunStatus(
        run_dir=run_dir, trainer=trainer, progress=_progress(run_dir, training=bool(trainer and trainer["alive"])),
        checkpoints=[{"step": c.step, "state": c.state, "detail": c.detail, "world_size": c.world_size}
                     for c in checkpoint_statuses(run_dir, hashes=False)],
        published=[c.step for c in published_checkpoints(run_dir)],
        evaluated={r["step"]: headline(r["metrics"]) for r in read_results(run_dir)},
        eval_failures=_eval_failures(run_dir),
        events=read_events(run_dir))


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics worth one line (acc@1, R@1, nDCG@10); all of them when none is."""
    return {k: v for k, v in metrics.items() if k.endswith(HEADLINE)} or metrics


def _progress(run_dir: str, training: bool) -> Optional[dict[str, Any]]:
    record = read_progress(run_dir)
    if record is None:
        return None
    age = max(time.time() - record.get("time", time.time()), 0.0)
    eta = record.get("eta_s")
    left = max(eta - age, 0.0) if training and eta is not None else None
    return {**record, "age_s": round(age, 1), "eta_left_s": left}


def _eval_failures(run_dir: str) -> dict[int, dict[str, Any]]:
    """Published steps whose newest eval attempt failed (the scheduler retries them up to eval.max_attempts)."""
    out = {}
    for job, claim in latest_attempts(claims_dir(run_dir)).items():
        step = parse_step(job)
        if step is not None and claim.status == CLAIM_FAILED:
            out[step] = {"attempt": claim.attempt, "error": claim.error, "host": claim.host}
    return out


# ----------------------------------------------------------------------------------- the text
def format_status(s: RunStatus) -> str:
    """A screenful for a person: trainer, progress, data, checkpoints, evaluations, then the events."""
    lines = [f"run_dir      {s.run_dir}", f"trainer      {_trainer_line(s)}"]
    p = s.progress
    if p is not None:
        total = p.get("total") or 0
        pct = f" ({100 * p['step'] / total:.0f}%)" if total else ""
        eta = f", ETA {format_duration(p['eta_left_s'])}" if p.get("eta_left_s") is not None else ""
        lines.append(f"progress     step {p['step']}/{total}{pct}, loss {p['loss']:.4f}, "
                     f"{p['samples_per_s']:.0f} samples/s{eta} (logged {format_duration(p['age_s'])} ago)")
        for name, src in sorted((p.get("sources") or {}).items()):
            lines.append(f"data         {name}: {int(src['samples'])} samples read, {int(src['bad_samples'])} bad")
    else:
        lines.append("progress     no step logged yet")
    lines.append(f"checkpoints  {_checkpoints_line(s)}")
    lines.append(f"published    {_steps(s.published)}")
    done = [f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in m.items())
            for step, m in sorted(s.evaluated.items())]
    waiting = [step for step in s.published if step not in s.evaluated and step not in s.eval_failures]
    lines.append(f"evaluated    {_steps(sorted(s.evaluated))}" + (f"; not yet: {_steps(waiting)}" if waiting else ""))
    lines += [f"             {d}" for d in done[-3:]]
    for step, f in sorted(s.eval_failures.items()):
        lines.append(f"eval failed  step {step}, attempt {f['attempt']} on {f['host']}: {f['error']}")
    if s.events:
        lines.append("events")
        lines += [f"  {_when(e['time'])}  {describe_event(e)}" for e in s.events]
    return "\n".join(lines)


def describe_event(e: dict[str, Any]) -> str:
    kind = e.get("kind")
    if kind == events.STARTED:
        how = "resumed" if e.get("resumed") else "started"
        return f"{how} at step {e['step']} of {e['total']} with {e['world_size']} workers on {e['host']}"
    if kind == events.FAILED:
        return "failed: " + "; ".join(f"worker {rank}: {err}" for rank, err in e.get("errors", {}).items())
    if kind == events.STOPPED:
        return f"stopped by {e['signal']} after checkpointing step {e['step']}"
    if kind == events.DATA_ENDED:
        return f"the data ended at step {e['step']}: {e['reason']}"
    if kind == events.FINISHED:
        return f"finished at step {e['step']}"
    return f"{kind}: {e}"


def _trainer_line(s: RunStatus) -> str:
    t = s.trainer
    if t is None:
        last = s.events[-1] if s.events else None
        return "none" + (f" (last event: {describe_event(last)})" if last else "")
    state = "training" if t["alive"] else "stale lease (its driver stopped renewing it)"
    return (f"{state}: {t['command']} on host {t['host']}, pid {t['pid']}, lease renewed "
            f"{format_duration(t['renewed_s_ago'])} ago")


def _checkpoints_line(s: RunStatus) -> str:
    if not s.checkpoints:
        return "none yet"
    complete = [c["step"] for c in s.checkpoints if c["state"] == "complete"]
    other = [f"{c['step']} {c['state']}" + (f" ({c['detail']})" if c["detail"] else "")
             for c in s.checkpoints if c["state"] != "complete"]
    resume = f"; a resume starts at step {s.resume_step}" if s.resume_step is not None else ""
    return f"complete {_steps(complete)}{resume}" + (f"; {'; '.join(other)}" if other else "")


def _steps(steps: list[int]) -> str:
    """`0, 100, 200` (the last 8 when there are more)."""
    if not steps:
        return "none"
    shown = ", ".join(map(str, steps[-8:]))
    return shown if len(steps) <= 8 else f"{len(steps)} steps, newest {shown}"


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def status_json(s: RunStatus) -> dict[str, Any]:
    return asdict(s) | {"resume_step": s.resume_step}
