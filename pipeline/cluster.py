"""The Ray a run uses: the cluster at `cluster.address`, or a local one that the driver starts and stops.

A local Ray runs on one machine for one job, started and stopped by the driver, so it starts only what
such a job uses: no autoscaler monitor (nothing autoscales one machine) and no dashboard or job server
(nothing queries them); its servers listen on 127.0.0.1 only, and it stops all at once.
"""
from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sys
from typing import Any, Optional

import psutil

from pipeline.config import Config, ConfigError
from pipeline.log import get_logger

log = get_logger(__name__)

LOCAL_OBJECT_STORE_BYTES = 256 * 2**20     # the data never goes through it; pages never touched cost no memory
# No node of a local Ray is ever drained (Ray Train's preemption watcher is an actor polling for
# nothing), no dashboard reads Ray Train's metrics, and the workers Ray would prestart for the driver
# never serve Ray Train's actors (they get their own): each is a process, or CPU seconds taken from the
# start-up of a 2-core machine. Polling the workers of one machine every 0.25 s (not 2 s) costs
# nothing and ends the run sooner. Set any of these in the environment to override.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_prestart_worker_first_driver": "0",
}

_local_node: Optional[Any] = None          # the head node of the local Ray this process started


def connect(cfg: Config) -> bool:
    """Join the Ray cluster at `cluster.address`, or start a new local one (never another session's);
    True when it started one.

    Every run uses Ray's token authentication unless `cluster.auth` is "disabled": a local Ray gets a
    fresh random token (in the environment of its processes only, never printed), and a cluster's
    token must be given in `RAY_AUTH_TOKEN` or `RAY_AUTH_TOKEN_PATH`. A local Ray runs in Ray's
    single-machine mode, where every server it starts listens on 127.0.0.1 only. Both are read by Ray
    when it is imported, so this runs before anything imports it. A Ray already initialised in this
    process (a test's, a notebook's) is used as it is.
    """
    already = sys.modules.get("ray")
    if already is not None and already.is_initialized():
        return False
    local = not cfg.cluster.address
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if cfg.logging.level != "debug":              # our lines name their rank or stage; -v keeps Ray's "(pid=…)"
        os.environ.setdefault("RAY_DISABLE_WORKER_LOG_PREFIX", "1")
    os.environ["RAY_AUTH_MODE"] = cfg.cluster.auth
    if cfg.cluster.auth == "token" and local:
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    elif cfg.cluster.auth == "token" and not _cluster_token_given():
        raise ConfigError(f"cluster.address = {cfg.cluster.address} with cluster.auth = token: give the cluster's "
                          "token in RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token); README 'Security' "
                          "says how the launch files pass it. cluster.auth=disabled turns authentication off")
    elif cfg.cluster.auth == "disabled":
        log.warning("cluster.auth = disabled: anyone who can reach the Ray ports can run code in this cluster")
    if local:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"    # Ray's single-machine mode: loopback only
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")        # gloo's own sockets on loopback too
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    import ray
    if not local:
        ray.init(address=cfg.cluster.address, log_to_driver=True)
        return False
    eval_cpus = cfg.eval.cpus if cfg.eval.schedule != "off" else 0
    needed = cfg.cluster.max_workers * cfg.cluster.cpus_per_worker + eval_cpus
    global _local_node
    num_cpus = max(os.cpu_count() or 1, int(needed + 0.999))
    _local_node = _start_local_node(num_cpus)
    ray.init(address=_local_node.address, log_to_driver=True, logging_level=logging.WARNING)   # not "existing"
    log.info("started a local Ray: %d CPUs, its servers on 127.0.0.1 (GCS %s)", num_cpus, _local_node.address)
    if ray.util.get_node_ip_address() != "127.0.0.1":
        log.warning("Ray was imported before contrast chose its single-machine mode: the local Ray's servers "
                    "listen on every interface (token authentication still guards them)")
    return True


def _start_local_node(num_cpus: int) -> Any:
    """The head node of a local Ray, as `ray.init()` would start it less two Python processes (about
    190 MB and 1.5 CPU-seconds of start-up): the autoscaler's monitor and the dashboard's API server
    (also the job server and the state API), which nothing of a one-machine, one-job Ray uses. These
    are Ray 2.60's own methods (setup.cfg pins it)."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    class LocalNode(Node):
        def start_monitor(self) -> None:
            """Nothing autoscales one machine."""

        def start_api_server(self, **kwargs: Any) -> None:
            """Nothing queries this Ray's dashboard, jobs or state."""

    params = RayParams(num_cpus=num_cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    return LocalNode(params, head=True, shutdown_at_exit=False, spawn_reaper=True, ray_init_cluster=True)


def stop_ray(started_here: bool) -> None:
    """Leave Ray. A local Ray this driver started (`started_here`) is stopped with every process it
    started, all at once: its job is done or abandoned, and Ray's own stop gives each of its servers
    in turn a second to end (about 2 s); a Ray joined or started by someone else is only left."""
    import ray
    global _local_node
    if ray.is_initialized():
        ray.shutdown()
    if started_here and _local_node is not None:
        node, _local_node = _local_node, None
        servers = [psutil.Process(info.process.pid) for infos in node.all_processes.values() for info in infos
                   if info.process.poll() is None]
        _kill([p for server in servers for p in _with_children(server)])
        psutil.wait_procs(servers, timeout=5)         # reaped: they are this process's children
        node.destroy_external_storage()


def kill_descendants() -> None:
    """SIGKILL every process this driver started (a local Ray's servers, agents and workers, loader
    processes): stopping at once leaves none of them behind (Ray's agents outlive a vanished driver)."""
    _kill(psutil.Process().children(recursive=True))


def _with_children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return [process, *process.children(recursive=True)]
    except psutil.Error:
        return [process]


def _kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _cluster_token_given() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or os.path.isfile(path)
