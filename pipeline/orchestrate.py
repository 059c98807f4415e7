"""The Ray driver: training as a Ray Train `TorchTrainer` of `train_worker`s, the eval actor beside it.

One code path for every scale: a local Ray on a laptop or a cluster at `cluster.address` (`pipeline.cluster`);
the tests, the demo and a multi-node run all come through `train`. Ray Train's controller loop runs here,
in the driver.
"""
from __future__ import annotations

import contextlib
import copy
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline.cluster import connect, kill_descendants, stop_ray
from pipeline.config import Config, ConfigError
from pipeline.data import layout_world_sizes, open_train_stream, run_streams, world_sizes
from pipeline.eval.scheduler import start_eval_actor
from pipeline.layout import RAY, parse_step
from pipeline.log import Timeline, get_logger
from pipeline.models import check_source, run_tokenizer
from pipeline.train import interrupts
from pipeline.train.checkpoint import find_resume, latest_checkpoint, progress_key, refuse_existing
from pipeline.train.lease import Lease, hold
from pipeline.train.loop import launched_worker
from pipeline.train.progress import FAILED, record_event

log = get_logger(__name__)


class TrainingError(RuntimeError):
    """Training failed on the workers; the message carries each failing worker's error."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM reached the driver; the message says where the run stopped and how to resume."""

    def __init__(self, signum: int, step: Optional[int], resume_step: Optional[int]):
        self.exit_code = 128 + signum
        at = f"at step {step}" if step else "before step 1"
        then = f"from step {resume_step}" if resume_step else "from the start (no checkpoint yet)"
        super().__init__(f"interrupted {at} ({signal.Signals(signum).name}); rerun the same command to resume {then}")


@dataclass
class Trained:
    """What `train` did: Ray Train's result, and the scheduled evaluation beside it."""
    result: Any
    evaluated: list[int] = field(default_factory=list)
    eval_failed: dict[int, str] = field(default_factory=dict)


def train(cfg: Config) -> Trained:
    """Train `cfg` on `cluster.num_workers` Ray workers (a count, or a range [min, max]: elastic).

    Holds the run_dir lease while it runs (a second trainer is refused). Refusals that need no worker
    are raised here, before anything starts (`preflight`). The first SIGINT or SIGTERM, to the driver
    or to a worker, has the workers checkpoint their next step (within `checkpoint.grace_s`), then the
    run stops cleanly (`TrainingInterrupted`, Ray shut down); resuming is rerunning. A second one stops
    at once. The start-up timeline begun here is continued by the workers; rank 0 logs it at its first
    step.
    """
    startup = Timeline()
    startup.mark("python, imports, config")
    cfg = absolute_paths(cfg)
    with hold(cfg.run_dir, cfg.cluster.lease_ttl_s, "contrast train") as lease, Interrupts() as signals:
        progress, started_here, interrupted = Progress(cfg.run_dir, bar_total=bar_total(cfg)), False, False
        try:
            preflight(cfg)
            startup.mark("preflight")
            started_here = connect(cfg)
            startup.mark("ray start")
            signals.arm()                                 # ray.init installs its own SIGTERM handler
            interrupts.clear(cfg.run_dir)
            progress.start()
            trained = _fit(cfg, lease, startup, started_here)
            stopped = interrupts.stopped_at(cfg.run_dir)  # a worker had the signal and stopped after a checkpoint
            if stopped is not None:
                interrupted = True
                raise TrainingInterrupted(stopped[0], stopped[1], latest_step(cfg.run_dir))
            return trained
        except _Signal as e:
            interrupted = True
            _bounded(progress.read, timeout_s=3)          # the newest step, if Ray still answers
            resume = latest_step(cfg.run_dir)
            raise TrainingInterrupted(e.signum, max(progress.step or 0, resume or 0), resume) from None
        finally:
            progress.stop()
            if started_here or interrupted:               # a local Ray ends with its run; an interrupt leaves any
                _bounded(lambda: stop_ray(started_here), timeout_s=20)   # (its processes may have had the signal)


def _fit(cfg: Config, lease: Lease, startup: Timeline, started_here: bool) -> Trained:
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    c = cfg.cluster
    resources = {"CPU": c.cpus_per_worker, **({"GPU": c.gpus_per_worker} if c.use_gpu else {})}
    sizes = world_sizes(cfg, cfg.data.streams)
    trainer = _trainer_class(sizes, local=started_here)(
        launched_worker, train_loop_config={"config": cfg.to_dict(), "startup": startup.to_dict()},
        scaling_config=ScalingConfig(num_workers=(sizes[0], sizes[-1]) if c.elastic else c.num_workers,
                                     use_gpu=c.use_gpu, resources_per_worker=resources,
                                     placement_strategy=c.placement_strategy),
        torch_config=torch_config(cfg),
        run_config=RunConfig(name=time.strftime("train-%Y%m%d-%H%M%S"), **ray_storage(cfg.run_dir),
                             failure_config=FailureConfig(max_failures=c.max_failures),
                             callbacks=[failure_events(cfg.run_dir)],
                             logging_config=LoggingConfig(log_level=ray_train_log_level(cfg))))
    evaluator = start_eval_actor(cfg) if cfg.eval.schedule != "off" else None
    fit = Background(trainer.fit)
    try:
        result = fit.wait(check=lambda: _refuse_lost(lease))
    except _Signal as e:
        if evaluator is not None:                 # an interrupt evaluates nothing more (`contrast watch` can)
            _bounded(evaluator.stop, timeout_s=10)
        _checkpoint_then_stop(cfg, fit, e.signum)
        raise
    except Exception as e:
        if evaluator is not None:
            evaluator.finish(timeout_s=cfg.eval.claim_ttl_s)
        raise e if isinstance(e, TrainingError) else TrainingError(failure_summary(e)) from e
    outcome = evaluator.finish(timeout_s=cfg.eval.claim_ttl_s) if evaluator is not None else {}
    return Trained(result, outcome.get("evaluated", []), outcome.get("failed", {}))


def _checkpoint_then_stop(cfg: Config, fit: Background, signum: int) -> None:
    """After a signal to the driver: ask the workers to checkpoint their next step and stop, and wait for
    them up to `checkpoint.grace_s` (less if Ray stops answering: its processes may have had it too)."""
    if cfg.checkpoint.grace_s <= 0:
        return
    log.warning("%s: the workers checkpoint their next step, then stop (up to checkpoint.grace_s = %g s; "
                "the same signal again stops at once)", signal.Signals(signum).name, cfg.checkpoint.grace_s)
    try:
        interrupts.request_stop(cfg.run_dir, signum)
        fit.wait(timeout_s=cfg.checkpoint.grace_s, check=lambda: interrupts.stopped_at(cfg.run_dir))
    except Exception as e:                        # Ray gone, or training failed meanwhile: stop now
        log.warning("stopping without waiting for a checkpoint: %s: %s", type(e).__name__, e)


def _refuse_lost(lease: Lease) -> None:
    if lease.lost:
        raise TrainingError(f"another driver took over the run_dir lease ({lease.lost}): two trainers must not "
                            "write into one run_dir; this one stops")


def _trainer_class(sizes: list[int], local: bool) -> type:
    """Ray Train's TorchTrainer, its controller run in this driver (`run_controller_here`), without the
    helper actors a run of ours does not need: the dataset manager, made for Ray Data datasets (the
    workers stream their shards themselves), and the placement-group cleaner, which frees the workers'
    resources should the controller's actor die while the driver lives on (here they are the driver's
    own, freed by Ray when it ends). A local Ray (`local`) also goes without the autoscaling coordinator
    a fixed worker group asks for its resources (one node: nothing to autoscale; the controller waits
    seconds for it to start). With an elastic worker range, the group starts or resizes only to counts
    the data layout allows (`sizes`): the largest that the free resources of the nodes not being drained
    hold (Ray's own count includes draining nodes, where no new worker can start, and would wait for
    them until the group's start times out). These are Ray Train 2.60's own hooks (setup.cfg pins it)."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    class LayoutScalingPolicy(ElasticScalingPolicy):
        def _count_possible_workers(self, reserved_resources: Any) -> int:
            import ray
            draining = ray._private.state.state.get_draining_nodes() or {}
            usable = {node: r for node, r in reserved_resources.items() if node not in draining}
            possible = super()._count_possible_workers(usable)
            return max((n for n in sizes if n <= possible), default=0)

    class LocalFixedScalingPolicy(FixedScalingPolicy):
        def after_controller_start(self, train_run_context: Any) -> None:
            """No resource request: nothing autoscales a local Ray."""

        def _maybe_send_resource_request(self) -> None:
            """As above."""

    class ContrastTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list:
            unneeded = (DatasetsCallback, PlacementGroupCleanerCallback)
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unneeded)]

        def _initialize_and_run_controller(self, *, scaling_policy: Any, **kwargs: Any) -> Any:
            if self.scaling_config.elasticity_enabled:
                scaling_policy = LayoutScalingPolicy(self.scaling_config)
            elif local and type(scaling_policy) is FixedScalingPolicy:
                scaling_policy = LocalFixedScalingPolicy(scaling_policy.scaling_config)
            return run_controller_here(scaling_policy=scaling_policy, **kwargs)
    return ContrastTrainer


def run_controller_here(**controller_args: Any) -> Any:
    """Ray Train's controller loop in this driver, not in an actor of its own: that actor is one more
    process importing Ray Train and torch (2-3 CPU-seconds before any worker starts, 400 MB) to run a
    loop that polls the workers. It runs where Ray Train would place it anyway (the driver's node), and
    it ends with the driver as its actor did. The workers get no handle to it: it serves only
    `ray.train.get_all_reported_checkpoints`, which nothing here calls."""
    import asyncio

    import ray
    from ray.train.v2._internal.execution.controller import TrainController
    from ray.train.v2._internal.execution.worker_group import WorkerGroup

    class DriverWorkerGroup(WorkerGroup):
        def _init_train_context_on_workers(self, workers: list, sync_actor: Any, train_context_args: dict) -> None:
            ray.get([worker.actor.init_train_context.remote(
                train_run_context=self._train_run_context, distributed_context=worker.distributed_context,
                synchronization_actor=sync_actor, storage_context=self._storage_context,
                worker_callbacks=self._worker_callbacks_to_propagate, controller_actor=None,
                **{arg: values[i] for arg, values in train_context_args.items()})
                for i, worker in enumerate(workers)])
            self._decorate_worker_log_file_paths(workers)

    class DriverController(TrainController):
        worker_group_cls = DriverWorkerGroup

    controller = DriverController(**controller_args)
    asyncio.run(controller.run())
    return controller.get_result()


class _Signal(BaseException):
    def __init__(self, signum: int):
        self.signum = signum


class Interrupts:
    """While active, the first SIGINT or SIGTERM raises `_Signal` in the main thread (Ray's handlers would
    end the driver without a word, or in a C++ stack dump); a second one ends the process at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> Interrupts:
        self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        self.arm()
        return self

    def arm(self) -> None:
        for s in self.SIGNALS:
            signal.signal(s, self._first)

    def _first(self, signum: int, frame: Any) -> None:
        for s in self.SIGNALS:
            signal.signal(s, self._again)
        raise _Signal(signum)

    @staticmethod
    def _again(signum: int, frame: Any) -> None:
        os.write(2, f"contrast: {signal.Signals(signum).name} again: stopping now\n".encode())
        kill_descendants()
        os._exit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def bar_total(cfg: Config) -> Optional[int]:
    """The steps of a progress bar, when there is one: on a terminal, unless `logging.progress` is off."""
    return cfg.train.steps if cfg.logging.progress and sys.stderr.isatty() else None


class Progress:
    """The last step rank 0 finished (`report_progress`), polled from Ray's key-value store, so that an
    interrupt can name it even when the signal also took Ray's own processes; with `bar_total`, drawn as
    a progress bar from the first step on. The bar is Ray's (`tqdm_ray`): Ray clears it while it prints
    the workers' lines, and draws it again after them."""

    def __init__(self, run_dir: str, every_s: float = 2.0, bar_total: Optional[int] = None):
        self.key, self.every_s = progress_key(run_dir), (0.5 if bar_total else every_s)
        self.step: Optional[int] = None
        self.bar_total, self.bar = bar_total, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="contrast-progress", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.every_s)
        if self.bar is not None:
            with contextlib.suppress(Exception):              # the last step, if Ray still answers
                self.read()
            self.bar.close()

    def read(self) -> None:
        from ray.experimental import internal_kv
        value = internal_kv._internal_kv_get(self.key)
        self.step = int(value) if value else self.step
        if self.bar_total and self.step:
            self._draw(self.step)

    def _draw(self, step: int) -> None:
        if self.bar is None:
            from ray.experimental.tqdm_ray import tqdm
            self.bar = tqdm(desc="train", total=self.bar_total, unit="step", flush_interval_s=0)   # we poll: draw each
        self.bar.update(step - self.bar.n)

    def _poll(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.read()
            except Exception:                             # Ray going down: keep the last value seen
                return


class Background:
    """`fn()` in a helper thread while the main thread waits in Python, where a signal handler can always
    run and raise (in Ray's C++ waits it cannot raise safely, and Ray Train would replace the SIGINT
    handler in the main thread). It waits on an Event, not `Thread.join`: a signal raising inside
    `join` makes Python 3.11 take the thread for finished (bpo-45274's clean-up)."""

    def __init__(self, fn: Callable[[], Any]):
        self._box: dict[str, Any] = {}
        self._done = threading.Event()
        threading.Thread(target=self._run, args=(fn,), name="contrast-fit", daemon=True).start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self._box["result"] = fn()
        except BaseException as e:                    # handed to the caller, in the main thread
            self._box["error"] = e
        finally:
            self._done.set()

    def wait(self, timeout_s: Optional[float] = None, check: Callable[[], Any] = lambda: None) -> Any:
        """`fn`'s result, or its exception raised; `check()` runs between waits (it may raise). With
        `timeout_s`, returns None once it has passed or once `check()` returns a true value."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not self._done.wait(0.2):
            done = check()
            if deadline is not None and (done or time.monotonic() > deadline):
                self._done.wait(2.0)                  # a moment for what was just answered
                break
        if "error" in self._box:
            raise self._box["error"]
        return self._box.get("result")


def _bounded(fn: Any, timeout_s: float) -> None:
    """Run a clean-up step, giving up after `timeout_s` (it may wait on Ray processes already gone)."""
    worker = threading.Thread(target=fn, daemon=True)
    worker.start()
    worker.join(timeout_s)


def latest_step(run_dir: str) -> Optional[int]:
    url = latest_checkpoint(run_dir)
    return parse_step(url.rstrip("/").rsplit("/", 1)[-1]) if url else None


def absolute_paths(cfg: Config) -> Config:
    """A copy of `cfg` with its local relative paths made absolute: Ray workers run in other folders."""
    def fix(url: str) -> str:
        return url if "://" in url or url.startswith("pipe:") else os.path.abspath(url)

    cfg = copy.deepcopy(cfg)
    cfg.run_dir = fix(cfg.run_dir)
    cfg.data.train_urls = [fix(u) for u in cfg.data.train_urls]
    for source in cfg.data.sources:
        source.urls = [fix(u) for u in source.urls]
    cfg.data.eval_dir = cfg.data.eval_dir and fix(cfg.data.eval_dir)
    cfg.data.tokenizer = cfg.data.tokenizer and fix(cfg.data.tokenizer)
    for tower in (cfg.model.image, cfg.model.text):
        tower.hf_path = tower.hf_path and fix(tower.hf_path)
    cfg.model.init_from = cfg.model.init_from and fix(cfg.model.init_from)
    if (cfg.model.init_from_config or "").endswith(".json"):     # a JSON file, not a config name
        cfg.model.init_from_config = fix(cfg.model.init_from_config)
    return cfg


def preflight(cfg: Config) -> None:
    """What the workers would refuse, refused once in the driver: a run_dir of another model,
    a `model.init_from` that does not fit the data, `train.resume=never` over existing checkpoints, a
    world size the data layout cannot split, missing shards or tokenizer, shards too few for the data
    stream, every checkpoint damaged. (A worker error would cost a Ray start, and `cluster.max_failures`
    restarts of something that cannot succeed.)

    Fixes `data.streams` (S) in `cfg` for the workers: every group of an elastic run, whatever its
    size, then reads the same S virtual streams, so the batches do not depend on the sizes it gets."""
    check_source(cfg)
    storage.makedirs(cfg.run_dir)                  # an object store's bucket must exist (no silent new bucket)
    if cfg.train.resume == "never":
        refuse_existing(cfg)
    resume = find_resume(cfg, hashes=False)            # sizes only: the workers' rank 0 reads every sha256
    cfg.data.streams = run_streams(cfg, resume.data_state if resume else None)
    sizes = world_sizes(cfg, cfg.data.streams)
    if not sizes:
        raise ConfigError(f"cluster.num_workers = {cfg.cluster.num_workers}: no worker count there divides the "
                          f"{cfg.data.streams} virtual streams of this run (data.streams, or the checkpoint's); "
                          f"worker counts it allows: {layout_world_sizes(cfg.data.streams)}")
    stream = open_train_stream(cfg, rank=0, world_size=sizes[-1], state=resume.data_state if resume else None,
                               tokenizer=run_tokenizer(cfg))
    if resume:
        resume.check_tokenizer(stream.tokenizer)


def torch_config(cfg: Config) -> Any:
    """How the workers' process group forms: NCCL on GPUs, else gloo; collectives that wait longer than
    `cluster.collective_timeout_s` fail instead of hanging. A local run rendezvous through a file, so no
    TCP port opens (torch's TCP rendezvous store listens on every interface). Every worker process first
    takes SIGTERM/SIGINT as a request to checkpoint and stop (`interrupts.install_signal_handlers`)."""
    from ray.train.torch import TorchConfig
    backend = _backend(local=not cfg.cluster.address)

    class ContrastTorchConfig(TorchConfig):
        @property
        def backend_cls(self) -> type:
            return backend

    return ContrastTorchConfig(backend="nccl" if cfg.cluster.use_gpu else "gloo",
                               timeout_s=int(cfg.cluster.collective_timeout_s))


def _backend(local: bool) -> type:
    from ray.train.torch.config import _set_torch_distributed_env_vars, _setup_torch_process_group, _TorchBackend

    class ContrastBackend(_TorchBackend):
        """Ray Train's torch backend: the workers' signal handlers (installed in each worker's main thread,
        where Ray runs actor calls), then the process group; a local run's through a FileStore."""

        def on_start(self, worker_group: Any, backend_config: Any) -> None:
            import ray
            worker_group.execute(interrupts.install_signal_handlers)
            if not local:
                return super().on_start(worker_group, backend_config)
            worker_group.execute(_set_torch_distributed_env_vars)
            url = "file://" + os.path.join(tempfile.gettempdir(), f"contrast-rendezvous-{secrets.token_hex(8)}")
            ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                       world_rank=i, world_size=len(worker_group), init_method=url,
                                                       timeout_s=backend_config.timeout_s)
                     for i in range(len(worker_group))])
    return ContrastBackend


def failure_events(run_dir: str) -> Any:
    """A Ray Train callback (it runs here, in the driver's controller) recording each failure of the worker
    group in `run_dir/events/` with every failing worker's own error, whether Ray Train restarts the group
    after it or gives up: `contrast status` lists them."""
    from ray.train import UserCallback

    class FailureEvents(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            errors = {str(rank): _worker_error(e) for rank, e in sorted(worker_exceptions.items())}
            record_event(run_dir, FAILED, errors=errors)
    return FailureEvents()


def _worker_error(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error
    return f"{type(cause).__name__}: {cause}"


def ray_train_log_level(cfg: Config) -> str:
    """Ray Train's own console lines (its worker group's start, the process group) only at `-v`: the run
    says what matters itself. They always reach Ray's session logs (`/tmp/ray/session_*/logs/train/`)."""
    return "INFO" if cfg.logging.level == "debug" else "WARNING"


def ray_storage(run_dir: str) -> dict[str, Any]:
    """Where Ray Train keeps its own records (`run_dir/ray`), through fsspec when run_dir is remote."""
    if storage.is_local(run_dir):
        return {"storage_path": os.path.abspath(storage.join(storage.local_path(run_dir), RAY))}
    import pyarrow.fs
    fs, path = storage.filesystem(run_dir)
    return {"storage_path": f"{path.rstrip('/')}/{RAY}",
            "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def failure_summary(error: BaseException) -> str:
    """One line per failing worker with its own error, not Ray's wrapping of it."""
    failures = getattr(error, "worker_failures", None)
    if not failures:
        return f"training failed: {type(error).__name__}: {error}"
    lines = [f"worker {rank}: {_worker_error(exc)}" for rank, exc in sorted(failures.items())]
    return "training failed:\n  " + "\n  ".join(lines)
