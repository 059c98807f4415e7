"""How each cost of the pipeline grows with the work: shards, global batch, workers, model size, run length.

For each dimension the benchmark runs the same job at growing scales, each measurement in a fresh
process (so one scale's memory cannot hide in another's), and prints a table (scale, time, peak RSS,
bytes), the fitted growth exponent k of each cost (cost ∝ scaleᵏ, a least-squares line in log-log over
the scales measured), the growth the design expects, and a verdict. Log-log plots go to --out.

  shards   N small shards (4 samples each, hard links of one tar) with a manifest, local and on an
           S3-compatible server on 127.0.0.1 (moto, when installed): rank 0 of 2 opens the stream
           (resolve the shards, plan the mixture) and takes its first batch; then 20 more batches
           (per-step time), the stream's state (bytes of the resume record), a reopen from that state
           and its first batch (resume), and `contrast data inspect` over the shards (local only:
           it reads every shard, linear by design). Expected: open and resume linear at most (the plan
           lists the shards once), per step flat, plan memory linear with a small constant.
  batch    global batch B (tiny model, 32 px, gradient cache chunk 256, tiled CLIP loss), 2 gloo ranks:
           CPU seconds per sample and peak RSS per rank of one cached step. Expected: time per sample
           flat until the loss's N² term shows; peak RSS growing only with the batch's own inputs and
           embeddings (target: peak from the smallest to the largest batch ≤ 1.3×).
  workers  W Ray Train workers on a simulated multi-node Ray cluster (tiny model, fixed global batch):
           start-up CPU per worker, the workers' CPU per step, checkpoint save, launch and resume to
           the first step, the driver's peak RSS. Expected: flat in W apart from process spawn.
  model    per ZeRO stage, each model at 224 px on 2 workers: one cached step, checkpoint + publish,
           universal conversion (a process of its own), resume on 1 worker; then the RSS growth of
           each rank of a ZeRO-3 publish in copies of the weights. Expected: linear in the parameters;
           no rank above one copy.
  run      a `contrast train` run of S steps (tiny model), interrupted (SIGTERM, SIGKILL) and resumed
           in the full mode, RSS of the driver, every worker, the evaluation actor and Ray's own processes
           sampled every second: slope of each in MB per 1,000 steps over the second half of the run (the
           evaluation actor apart: its start is not growth), disk use of the run
           folder against `checkpoint.keep`, TensorBoard steps, and the final weights against an
           uninterrupted run. Expected: no upward slope; disk bounded; the same weights.

    python benchmarks/scale.py [--quick] [--only shards,batch,workers,model,run] [--out build/scale]

--quick (about 2.5 minutes on an idle 2-core machine; tests/test_scale.py runs it) measures small scales
of each dimension.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ROOT = Path(__file__).resolve().parent.parent
ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
MB = 2 ** 20


# ------------------------------------------------------------------------------------- results
@dataclass
class Cost:
    """One measured cost of a dimension: its column in the table, its expected exponent."""
    name: str
    unit: str
    expected: float                       # the exponent the design allows (cost ∝ scale^expected)
    tolerance: float = 0.25               # slack above `expected` before the verdict says it grows too fast


@dataclass
class Dimension:
    name: str
    scale: str                            # what the x axis counts
    costs: list[Cost]
    extras: list[str] = field(default_factory=list)              # columns shown but not fitted
    rows: list[dict[str, Any]] = field(default_factory=list)     # {"scale": x, cost name: value, ...}

    def series(self, cost: str) -> tuple[list[float], list[float]]:
        pts = [(r["scale"], r[cost]) for r in self.rows if r.get(cost) is not None and r[cost] > 0]
        return [p[0] for p in pts], [p[1] for p in pts]


def power_fit(xs: list[float], ys: list[float]) -> Optional[tuple[float, float]]:
    """(k, c) of the least-squares fit log y = k log x + c; None with fewer than two distinct scales."""
    if len(set(xs)) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    k = sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)
    return k, my - k * mx


def exponent(xs: list[float], ys: list[float]) -> Optional[float]:
    """k of `power_fit`: cost ∝ scaleᵏ."""
    fit = power_fit(xs, ys)
    return None if fit is None else fit[0]


def verdicts(dim: Dimension) -> list[dict[str, Any]]:
    """Per cost: the fitted exponent, the expected one, and whether it grows as designed."""
    out = []
    for c in dim.costs:
        k = exponent(*dim.series(c.name))
        ok = None if k is None else k <= c.expected + c.tolerance
        out.append({"cost": c.name, "k": k, "expected": c.expected, "ok": ok})
    return out


def print_dimension(dim: Dimension) -> None:
    print(f"\n== {dim.name}: cost against {dim.scale}")
    names = [c.name for c in dim.costs] + dim.extras
    width = [max(11, len(n)) for n in names]
    print(f"  {dim.scale:>12}" + "".join(f" {n:>{w}}" for n, w in zip(names, width)))
    print(f"  {'':>12}" + "".join(f" {'(' + c.unit + ')':>{w}}" for c, w in zip(dim.costs, width)))
    for r in dim.rows:
        print(f"  {r['scale']:>12,}" + "".join(f" {_fmt(r.get(n)):>{w}}" for n, w in zip(names, width)))
    v = verdicts(dim)
    print(f"  {'growth k':>12}" + "".join(f" {_k(x['k']):>{w}}" for x, w in zip(v, width)))
    print(f"  {'expected ≤':>12}" + "".join(f" {x['expected']:>{w}.2f}" for x, w in zip(v, width)))
    print(f"  {'verdict':>12}" + "".join(f" {_verdict(x['ok']):>{w}}" for x, w in zip(v, width)))


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return v if isinstance(v, str) else f"{v:,}"


def _short(x: float) -> str:
    """1,203,073 → 1.2M, 65,536 → 65.5k: a tick label that fits."""
    if x >= 1e6:
        return f"{x / 1e6:.3g}M"
    return f"{x / 1e3:.3g}k" if x >= 1e4 else f"{x:g}"


def _k(k: Optional[float]) -> str:
    return "-" if k is None else f"{k:.2f}"


def _verdict(ok: Optional[bool]) -> str:
    return {None: "-", True: "as designed", False: "TOO FAST"}[ok]


def plot(dim: Dimension, out: Path) -> Path:
    """One log-log panel per cost, the points and their fitted line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullLocator, ScalarFormatter
    fig, axes = plt.subplots(1, len(dim.costs), figsize=(3.6 * len(dim.costs), 3.2), squeeze=False)
    for ax, c, v in zip(axes[0], dim.costs, verdicts(dim)):
        xs, ys = dim.series(c.name)
        ax.loglog(xs, ys, "o")
        fit = power_fit(xs, ys)
        if fit is not None:
            ax.loglog(xs, [math.exp(fit[1]) * x ** fit[0] for x in xs], "--", alpha=0.6)
        # Ticks at the measured scales and at 1-2-5 of the cost, plain labels with as many digits as the ticks
        # need (a cost within 1% of itself gets matplotlib's linear ticks): mathtext's 10^k labels and the
        # minor ticks took 2 s a figure.
        ax.set_xticks(xs, [_short(x) for x in xs], fontsize=7)
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter(useOffset=False))
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_minor_locator(NullLocator())
        ax.set_title(f"{c.name}  k={_k(v['k'])} (≤{c.expected:.2g})", fontsize=9)
        ax.set_xlabel(dim.scale, fontsize=8)
        ax.set_ylabel(c.unit, fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle(dim.name, fontsize=10)
    fig.tight_layout()
    path = out / f"{dim.name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------- children
def run_child(kind: str, *args: str, env: Optional[dict[str, str]] = None, timeout_s: float = 900) -> dict:
    """`scale.py --child KIND ARGS` in a fresh interpreter; its last stdout line, parsed as JSON."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *args]
    full_env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **(env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout_s)
    if out.returncode:
        raise RuntimeError(f"scale.py --child {kind} {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------- shards
def make_shards(folder: Path, n: int, template: Path) -> str:
    """`n` shards in `folder` (hard links of one 4-sample tar, copied again every 50,000 links: a file system
    caps the links of one file), its manifest.json and tokenizer.json."""
    folder.mkdir(parents=True)
    tar = template / "train" / "00000.tar"
    size = tar.stat().st_size
    names = [f"{i:06d}.tar" for i in range(n)]
    for i, name in enumerate(names):
        if i % 50_000 == 0:
            shutil.copy(tar, folder / name)
            source = folder / name
        else:
            os.link(source, folder / name)
    shutil.copy(template / "train" / "tokenizer.json", folder / "tokenizer.json")
    manifest = {"format": "webdataset", "shards": [{"name": s, "samples": 4, "bytes": size} for s in names]}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return str(folder)


def upload_shards(local: str, bucket_url: str) -> str:
    """The folder's files under `bucket_url` (s3://bucket/prefix), uploaded in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    import boto3
    bucket, prefix = bucket_url[len("s3://"):].split("/", 1)
    client = boto3.client("s3")
    files = sorted(os.listdir(local))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda f: client.upload_file(os.path.join(local, f), bucket, f"{prefix}/{f}"), files))
    return bucket_url


def child_shards(url: str, steps: int, inspect: bool) -> dict:
    """Open rank 0 of 2, first batch, `steps` more, state, resume, and `inspect`: times and bytes."""
    from pipeline.data import open_stream
    from pipeline.data.stream import StreamOptions

    options = StreamOptions(image_size=32, context_length=16, shuffle_buffer=16)
    base = rss_bytes()
    start = time.perf_counter()
    stream = open_stream(url, global_batch=16, rank=0, world_size=2, options=options)
    opened = time.perf_counter() - start
    plan = rss_bytes() - base
    batches = iter(stream)
    next(batches)
    first = time.perf_counter() - start
    step_start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    per_step = (time.perf_counter() - step_start) / steps
    state = stream.state_dict()
    stream.close()
    state_bytes = len(json.dumps(state))
    start = time.perf_counter()
    again = open_stream(url, global_batch=16, rank=0, world_size=2, state=state, options=options)
    next(iter(again))
    resume = time.perf_counter() - start
    again.close()
    inspect_s = None
    if inspect:
        from pipeline.data.inspection import inspect_shards
        start = time.perf_counter()
        inspect_shards(url)
        inspect_s = time.perf_counter() - start
    return {"inspect_s": inspect_s, "open_s": opened, "first_batch_s": first, "per_step_s": per_step,
            "plan_mb": plan / MB, "state_kb": state_bytes / 1024, "resume_s": resume,
            "peak_rss_mb": peak_rss_bytes() / MB}


SHARD_COSTS = [Cost("open_s", "s", 1.0), Cost("first_batch_s", "s", 1.0), Cost("plan_mb", "MB", 1.0),
               Cost("per_step_s", "s", 0.0), Cost("state_kb", "KiB", 0.0), Cost("resume_s", "s", 1.0),
               Cost("inspect_s", "s", 1.0)]


def shards_dimension(scales: list[int], where: str, tmp: Path, inspect_max: int) -> Dimension:
    """The shards dimension on local disk or (`where` = "s3") the S3 server of $AWS_ENDPOINT_URL."""
    from pipeline.data import synthesize
    template = tmp / "template"
    if not template.exists():
        synthesize(str(template), 4, eval_samples=4, image_size=32, shard_size=4, seed=0, progress=False)
    dim = Dimension(f"shards-{where}", "shards", SHARD_COSTS if where == "local" else SHARD_COSTS[:-1])
    for n in scales:
        url = make_shards(tmp / f"{where}-{n}", n, template)
        if where == "s3":
            url = upload_shards(url, f"s3://scale-bench/shards-{n}")
        row = run_child("shards", url, "20", str(int(where == "local" and n <= inspect_max)))
        dim.rows.append({"scale": n, **row})
        print(f"  {where} {n:>7,} shards: open {row['open_s']:.3f} s, first batch {row['first_batch_s']:.3f} s, "
              f"plan {row['plan_mb']:.1f} MB", flush=True)
    return dim


def s3_server() -> Optional[subprocess.Popen]:
    """A moto S3 server on 127.0.0.1 with the bucket `scale-bench`, its endpoint in the environment; None
    when moto is not installed."""
    exe = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(exe):
        return None
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    import boto3
    boto3.client("s3").create_bucket(Bucket="scale-bench")
    return proc


# ----------------------------------------------------------------------------------------- batch
def run_ranks(kind: str, world_size: int, *args: str, timeout_s: float = 1800) -> list[dict]:
    """`scale.py --child KIND ARGS` as the `world_size` ranks of a gloo group on 127.0.0.1; each rank's JSON."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, *args]
    procs = []
    for rank in range(world_size):
        env = {**os.environ, **ENV, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world_size)}
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        outs = [p.communicate(timeout=timeout_s) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        if p.returncode:
            raise RuntimeError(f"rank {rank} of scale.py --child {kind} failed ({p.returncode}):\n{err[-3000:]}")
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


def child_batch(global_batch: int, chunk: int) -> dict:
    """One rank's cached step of the tiny model at `global_batch` rows: CPU time, peak RSS, its input's bytes,
    and the tiled loss alone on embeddings of the same shape (the N² term)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from pipeline.config import ModelConfig
    from pipeline.gradcache import forward_backward
    from pipeline.losses import get_loss
    from pipeline.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="tiny"), image_size=32, context_length=16, vocab_size=1000).train()
    loss = get_loss("clip", tiled=True, tile_size=1024)
    g = torch.Generator().manual_seed(rank)
    warm = (torch.randn(2 * chunk, 3, 32, 32, generator=g), torch.randint(1, 1000, (2 * chunk, 16), generator=g))
    forward_backward(model, *warm, loss, chunk_size=chunk)
    n = global_batch // world
    images, texts = torch.randn(n, 3, 32, 32, generator=g), torch.randint(1, 1000, (n, 16), generator=g)
    model.zero_grad(set_to_none=True)
    dist.barrier()
    start = time.process_time()
    forward_backward(model, images, texts, loss, chunk_size=chunk)
    step_s = time.process_time() - start
    peak = peak_rss_bytes()
    with torch.no_grad():
        dim = model(image=warm[0][:1], text=warm[1][:1])["image"].shape[1]
    u = F.normalize(torch.randn(n, dim, generator=g), dim=1).requires_grad_()
    v = F.normalize(torch.randn(n, dim, generator=g), dim=1).requires_grad_()
    dist.barrier()
    start = time.process_time()
    loss(u, v, logit_scale=torch.tensor(1 / 0.07)).backward()
    loss_s = time.process_time() - start
    dist.destroy_process_group()
    return {"step_s": step_s, "loss_s": loss_s, "peak_rss_mb": peak / MB,
            "input_mb": (images.nbytes + texts.nbytes) / MB}


RSS_TARGET = math.log(1.3) / math.log(64)        # the target: ≤ 1.3× from 1k to 64k rows
BATCH_COSTS = [Cost("step_s_per_1k", "CPU s", 0.0), Cost("loss_s_per_1k", "CPU s", 1.0),
               Cost("peak_rss_mb", "MB", RSS_TARGET, 0.0), Cost("net_rss_mb", "MB", RSS_TARGET, 0.0)]


def batch_dimension(scales: list[int], chunk: int = 256) -> Dimension:
    """Global batch B at 2 ranks: the medians over the ranks of each cost; time per 1,000 samples."""
    dim = Dimension("batch", "global batch", BATCH_COSTS, extras=["input_mb", "loss_share"])
    for b in scales:
        ranks = run_ranks("batch", 2, str(b), str(chunk))
        step = statistics.median(r["step_s"] for r in ranks)
        loss = statistics.median(r["loss_s"] for r in ranks)
        peak = max(r["peak_rss_mb"] for r in ranks)
        inputs = ranks[0]["input_mb"]
        dim.rows.append({"scale": b, "step_s_per_1k": step / b * 1000 * 2, "loss_s_per_1k": loss / b * 1000 * 2,
                         "loss_share": loss / step, "peak_rss_mb": peak, "input_mb": inputs,
                         "net_rss_mb": peak - inputs})
        print(f"  batch {b:>6,}: step {step:.1f} CPU s per rank, loss alone {loss:.2f} s, peak RSS {peak:.0f} MB "
              f"(input {inputs:.0f} MB)", flush=True)
    return dim


# ------------------------------------------------------------------------------------------- run
STEP_LINE = re.compile(r"\[rank 0\] train: step (\d+)/")
CONTRAST = str(Path(sys.executable).with_name("contrast"))


def role(p: Any) -> str:
    """worker (a Ray Train worker), eval (the evaluation actor: it starts at the first evaluation, so it is
    fitted apart from Ray's long-lived processes), or ray (Ray's own processes: raylet, GCS, idle workers)."""
    try:
        title = " ".join(p.cmdline())
    except Exception:                                   # gone, or a zombie
        return "gone"
    return "worker" if "RayTrainWorker" in title else "eval" if "_EvalActor" in title else "ray"


class Watched:
    """One `contrast train` attempt in a session of its own; its step lines, and the RSS of every process
    of its tree and the run folder's disk use sampled every `every_s` seconds against the last step seen."""

    def __init__(self, args: list[str], run_dir: str, samples: list[dict], every_s: float = 1.0):
        import psutil
        self.proc = subprocess.Popen([CONTRAST, "train", *args], env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.step = 0
        self.run_dir, self.samples, self.every_s = run_dir, samples, every_s
        self._root = psutil.Process(self.proc.pid)
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if m := STEP_LINE.search(line):
                self.step = int(m.group(1))

    def _sample(self) -> None:
        import psutil
        while self.proc.poll() is None:
            try:
                tree = [self._root] + self._root.children(recursive=True)
                rss = {p.pid: (role(p) if p is not self._root else "driver", p.memory_info().rss) for p in tree}
            except psutil.Error:
                continue
            self.samples.append({"step": self.step, "rss": rss, **disk_use(self.run_dir)})
            time.sleep(self.every_s)

    def wait_for_step(self, step: int, timeout_s: float = 900) -> None:
        deadline = time.monotonic() + timeout_s
        while self.step < step:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no step {step}:\n{''.join(self.lines)[-3000:]}")
            time.sleep(0.05)

    def finish(self, expect: int = 0, timeout_s: float = 1800) -> None:
        code = self.proc.wait(timeout_s)
        if code != expect:
            raise RuntimeError(f"contrast train exited {code}, expected {expect}:\n{''.join(self.lines)[-3000:]}")

    def kill_everything(self) -> None:
        """SIGKILL the driver and every process it started, at once (a node gone)."""
        import psutil
        for p in [self._root] + self._root.children(recursive=True):
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait(60)


def folder_mb(folder: str) -> float:
    """MB of the files under `folder`."""
    total = 0
    for sub, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(sub, f))
            except OSError:
                pass
    return total / MB


def disk_use(run_dir: str) -> dict[str, float]:
    """MB under the run's resume checkpoints and its published weights."""
    return {f"{name}_mb": folder_mb(os.path.join(run_dir, name)) for name in ("checkpoints", "published")}


def published_parameters(run_dir: str, step: int) -> int:
    """Parameters of the model a run published at `step` (its vocabulary is the run's tokenizer's, not CLIP's)."""
    from safetensors import safe_open
    with safe_open(os.path.join(run_dir, "published", step_dir(step), "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def synth_data(tmp: Path, samples: int = 2048, size: int = 32, shard_size: int = 128, eval_samples: int = 64) -> str:
    """Synthetic samples (2,048 at 32 px by default) and their eval sets, made once per benchmark and shape."""
    data = tmp / f"data-{samples}-{size}"
    if not (data / "train" / "manifest.json").exists():
        subprocess.run([CONTRAST, "data", "synth", "--out", str(data), "--samples", str(samples), "--eval-samples",
                        str(eval_samples), "--image-size", str(size), "--shard-size", str(shard_size)], check=True,
                       env={**os.environ, **ENV}, capture_output=True)
    return str(data)


def run_job(data: str, run_dir: str, steps: int, every: int, keep: int, eval_every: int) -> list[str]:
    evals = ["eval.schedule=every", f"eval.every_k={max(1, eval_every // every)}", "eval.sets=[zeroshot_heldout]"] \
        if eval_every else ["eval.schedule=off"]
    return [str(ROOT / "configs/demo.yaml"), f"run_dir={run_dir}", f"data.train_urls=[{data}/train]",
            f"data.eval_dir={data}/eval", "data.image_size=32", "data.context_length=16", "data.shuffle_buffer=64",
            f"train.steps={steps}", "train.global_batch=16", "train.lr=1e-5", "train.warmup_steps=0",
            "train.log_every=1", "cluster.num_workers=2", "gradcache.chunk_size=4",
            f"checkpoint.every_steps={every}", f"checkpoint.keep={keep}", "cluster.lease_ttl_s=3",
            "logging.progress=false", *evals]


def soak(data: str, run_dir: str, steps: int, every: int, keep: int, eval_every: int,
         interruptions: list[tuple[int, str]]) -> tuple[list[dict], int]:
    """The run to `steps`, interrupted after each (step, "SIGTERM" | "SIGKILL") and resumed at once;
    its samples and the number of attempts."""
    args = run_job(data, run_dir, steps, every, keep, eval_every)
    samples: list[dict] = []
    for at, how in interruptions:
        attempt = Watched(args, run_dir, samples)
        attempt.wait_for_step(at)
        if how == "SIGTERM":
            os.kill(attempt.proc.pid, signal.SIGTERM)
            attempt.finish(expect=128 + signal.SIGTERM)
        else:
            attempt.kill_everything()
            time.sleep(3.5)                             # the dead driver's lease (cluster.lease_ttl_s=3) expires
        print(f"  {how} after step {attempt.step}; resuming", flush=True)
    last = Watched(args, run_dir, samples)
    last.finish()
    return samples, len(interruptions) + 1


def rss_by_step(samples: list[dict], who: str) -> list[tuple[int, float]]:
    """(step, MB) of the largest process of role `who` ("driver", "worker", "eval", "ray": all of them summed)."""
    out = []
    for s in samples:
        values = [rss for r, rss in s["rss"].values() if r == who]
        if values and s["step"] > 0:
            out.append((s["step"], (sum(values) if who == "ray" else max(values)) / MB))
    return out


def evaluation_peaks(points: list[tuple[int, float]], eval_every: int) -> list[tuple[int, float]]:
    """(the first step of each evaluation's window of `eval_every` steps, the evaluation actor's peak MB in it),
    from the first evaluation on. The actor holds only its imports until then, and the most while it evaluates,
    so a leak shows as peaks that rise from one evaluation to the next (its samples over time mostly show when
    an evaluation was running)."""
    peaks: dict[int, float] = {}
    for step, mb in points:
        if step >= eval_every:
            window = step // eval_every * eval_every
            peaks[window] = max(peaks.get(window, 0.0), mb)
    return sorted(peaks.items())


def slope_per_1k(points: list[tuple[int, float]]) -> Optional[float]:
    """MB per 1,000 steps of a least-squares line through the second half of the run's points."""
    half = [p for p in points if p[0] >= max(q[0] for q in points) / 2]
    if len({p[0] for p in half}) < 2:
        return None
    xs, ys = [p[0] for p in half], [p[1] for p in half]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return 1000 * sum((a - mx) * (b - my) for a, b in zip(xs, ys)) / sum((a - mx) ** 2 for a in xs)


def tensorboard_steps(run_dir: str, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps: list[int] = []
    folder = os.path.join(run_dir, "tensorboard")
    for sub, _, files in os.walk(folder):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(sub, size_guidance={"scalars": 0})
            acc.Reload()
            if tag in acc.Tags()["scalars"]:
                steps += [e.step for e in acc.Scalars(tag)]
    return sorted(steps)


def weights_difference(a: str, b: str) -> float:
    """Largest absolute difference between two published model.safetensors."""
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        raise RuntimeError(f"{a} and {b} hold different tensors")
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


RUN_COSTS = [Cost("driver_mb", "MB", 0.05, 0.05), Cost("worker_mb", "MB", 0.05, 0.05),
             Cost("eval_mb", "MB", 0.05, 0.05), Cost("ray_mb", "MB", 0.05, 0.05)]


def run_dimension(tmp: Path, steps: int, every: int, keep: int, eval_every: int, interruptions: int,
                  seed: int = 0) -> tuple[Dimension, dict]:
    """A run of `steps`, `interruptions` times interrupted (SIGTERM and SIGKILL alternately at random steps)
    and, when interrupted, an uninterrupted reference run: RSS and disk over the steps, and the checks."""
    import random
    data = synth_data(tmp)
    rng = random.Random(seed)
    ats = sorted(rng.sample(range(every // 2, steps - every // 2), interruptions))
    plan = [(at, ("SIGTERM", "SIGKILL")[i % 2]) for i, at in enumerate(ats)]
    start = time.monotonic()
    samples, attempts = soak(data, str(tmp / "soak"), steps, every, keep, eval_every, plan)
    wall = time.monotonic() - start
    dim = Dimension("run", "step", RUN_COSTS, extras=["checkpoints_mb", "published_mb"])
    marks = sorted({max(1, round(steps * f)) for f in (0.1, 0.25, 0.5, 0.75, 1.0)})
    series = {r: rss_by_step(samples, r.split("_")[0]) for r in ("driver_mb", "worker_mb", "eval_mb", "ray_mb")}
    if eval_every:
        series["eval_mb"] = evaluation_peaks(series["eval_mb"], eval_every)
    for mark in marks:
        row: dict[str, Any] = {"scale": mark}
        for name, pts in series.items():
            if name == "eval_mb" and eval_every:              # the peak of the evaluation window holding the mark
                row[name] = dict(pts).get(mark // eval_every * eval_every)
                continue
            near = [mb for st, mb in pts if abs(st - mark) <= max(5, steps // 50)]
            row[name] = statistics.median(near) if near else None
        disk = [s for s in samples if abs(s["step"] - mark) <= max(5, steps // 50)]
        row["checkpoints_mb"] = max(s["checkpoints_mb"] for s in disk) if disk else None
        row["published_mb"] = max(s["published_mb"] for s in disk) if disk else None
        dim.rows.append(row)
    tb = tensorboard_steps(str(tmp / "soak"))
    kept = os.listdir(tmp / "soak" / "checkpoints")
    one = disk_use(str(tmp / "soak"))["checkpoints_mb"] / max(1, len([k for k in kept if k.startswith("step")]))
    checks = {"steps": steps, "attempts": attempts, "interruptions": plan, "wall_s": wall,
              "slope_mb_per_1k": {n: slope_per_1k(p) for n, p in series.items() if p},
              "checkpoints_mb_max": max(s["checkpoints_mb"] for s in samples), "checkpoint_mb": one,
              "checkpoints_bound_mb": (keep + 1) * one, "keep": keep,
              "published_mb_end": samples[-1]["published_mb"] if samples else None,
              "tensorboard_steps_unique": len(tb) == len(set(tb)), "tensorboard_steps_complete":
              sorted(set(tb)) == list(range(1, steps + 1)),
              "evaluation_peaks_mb": series["eval_mb"] if eval_every else None}
    if interruptions:
        ref_args = run_job(data, str(tmp / "reference"), steps, every, keep, 0)
        Watched(ref_args, str(tmp / "reference"), []).finish()
        final = f"published/{step_dir(steps)}/model.safetensors"
        checks["final_weights_max_abs_diff"] = weights_difference(str(tmp / "soak" / final),
                                                                  str(tmp / "reference" / final))
    return dim, checks


def step_dir(step: int) -> str:
    from pipeline.layout import step_name
    return step_name(step)


def print_run_checks(checks: dict) -> None:
    print(f"  {checks['steps']} steps in {checks['attempts']} attempts ({checks['wall_s']:.0f} s), "
          f"interruptions {checks['interruptions'] or 'none'}")
    for name, slope in checks["slope_mb_per_1k"].items():
        print(f"  RSS slope over the second half, {name[:-3]:>6}: {_k(slope)} MB per 1,000 steps")
    print(f"  resume checkpoints on disk at most {checks['checkpoints_mb_max']:.1f} MB (one: "
          f"{checks['checkpoint_mb']:.1f} MB; bound with keep={checks['keep']} and one being written: "
          f"{checks['checkpoints_bound_mb']:.1f} MB); published weights "
          f"{checks['published_mb_end']:.1f} MB at the end (all kept, by design)")
    if checks.get("evaluation_peaks_mb"):
        print("  evaluation actor's peak per evaluation window: "
              + ", ".join(f"{mb:.0f} MB from step {step}" for step, mb in checks["evaluation_peaks_mb"]))
    print(f"  TensorBoard train/loss steps unique: {checks['tensorboard_steps_unique']}, "
          f"every step 1..{checks['steps']} once: {checks['tensorboard_steps_complete']}")
    if "final_weights_max_abs_diff" in checks:
        print(f"  final weights vs an uninterrupted run: largest difference {checks['final_weights_max_abs_diff']:.3g}")


# --------------------------------------------------------------------------------------- workers
def simulated_cluster(nodes: int, cpus_per_node: int) -> Any:
    """A Ray cluster of `nodes` nodes on this machine (a head without CPUs, the drivers' and Ray's own)."""
    os.environ.update(ENV)
    from ray.cluster_utils import Cluster
    small = dict(object_store_memory=96 * MB)
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0, include_dashboard=False, **small))
    for _ in range(nodes):
        cluster.add_node(num_cpus=cpus_per_node, **small)
    cluster.wait_for_nodes()
    return cluster


def step_wall_times(run_dir: str, tag: str = "train/loss") -> dict[int, float]:
    """step → wall time (epoch seconds) of its TensorBoard scalar, the last attempt's where steps repeat."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out: dict[int, float] = {}
    for sub, _, files in os.walk(os.path.join(run_dir, "tensorboard")):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(sub, size_guidance={"scalars": 0})
            acc.Reload()
            if tag in acc.Tags()["scalars"]:
                out.update((e.step, e.wall_time) for e in acc.Scalars(tag))
    return out


def cluster_worker_cpu(seen: dict[int, float]) -> None:
    """Update `seen` (pid → user + system CPU seconds) with the Ray Train workers under this process (the
    simulated cluster's raylets are its children; other sessions' Ray processes on the machine are not).
    A worker that has exited keeps its last reading, so the sum never falls as workers finish."""
    import psutil
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                t = p.cpu_times()
                seen[p.pid] = max(seen.get(p.pid, 0.0), t.user + t.system)
        except psutil.Error:
            pass


def timed_attempt(args: list[str], run_dir: str, first_step: int) -> dict[str, float]:
    """One attempt: launch → its first step's TensorBoard time; the workers' CPU seconds by then (per worker)
    and per step after it (all workers together); the median wall step time; the checkpoint times it
    logged; the driver's peak RSS."""
    launched = time.time()
    samples: list[dict] = []
    attempt = Watched(args, run_dir, samples, every_s=0.5)
    seen: dict[int, float] = {}
    cpu: list[tuple[int, int, float]] = []                 # (step seen, workers seen, their CPU seconds)
    while attempt.proc.poll() is None:
        cluster_worker_cpu(seen)
        if seen:
            cpu.append((attempt.step, len(seen), sum(seen.values())))
        time.sleep(0.25)
    attempt.finish()
    walls = step_wall_times(run_dir)
    later = sorted(s for s in walls if s > first_step)
    steps = [walls[b] - walls[a] for a, b in zip(later, later[1:])]
    saves = [float(m.group(1)) for m in map(CHECKPOINT_LINE.search, attempt.lines) if m]
    driver = [rss for s in samples for r, rss in s["rss"].values() if r == "driver"]
    at_first = next(c for c in cpu if c[0] >= first_step)
    at_last = next(c for c in cpu if c[0] >= cpu[-1][0])   # when the last step was seen: not the teardown after it
    per_step = (at_last[2] - at_first[2]) / max(1, at_last[0] - at_first[0])
    return {"first_step_s": walls[first_step] - launched, "startup_cpu_per_worker_s": at_first[2] / at_first[1],
            "cpu_per_step_s": per_step, "cpu_per_worker_step_s": per_step / at_last[1],
            "step_s": statistics.median(steps) if steps else None,
            "checkpoint_s": statistics.median(saves) if saves else None,
            "driver_mb": max(driver) / MB if driver else None}


CHECKPOINT_LINE = re.compile(r"step \d+ checkpointed and published \((\d+(?:\.\d+)?) s\)")
# At a fixed global batch a worker's share of the compute falls as 1/W while its share of each step's ring
# collectives stays one gradient's bytes: CPU per worker per step should fall, toward that constant.
WORKER_COSTS = [Cost("startup_cpu_per_worker_s", "CPU s", 0.0), Cost("cpu_per_worker_step_s", "CPU s", 0.0),
                Cost("checkpoint_s", "s", 0.25), Cost("driver_mb", "MB", 0.1)]


def workers_dimension(tmp: Path, scales: list[int], nodes: int, cpus_per_node: int, steps: int = 6,
                      resume: bool = True) -> Dimension:
    """W Ray Train workers on a simulated cluster, fixed global batch 64 over 16 virtual streams: start-up to
    the first step, step time, checkpoint save, resume to its first step (with `resume`), the driver's peak RSS."""
    data = synth_data(tmp)
    cluster = simulated_cluster(nodes, cpus_per_node)
    dim = Dimension("workers", "workers", WORKER_COSTS,
                    extras=["cpu_per_step_s", "first_step_s", "resume_first_step_s", "step_s"])
    try:
        for w in scales:
            run_dir = str(tmp / f"workers-{w}")
            base = run_job(data, run_dir, steps, steps // 2, 2, 0) + [
                f"cluster.address={cluster.address}", "cluster.auth=disabled", f"cluster.num_workers={w}",
                "data.streams=16", "train.global_batch=64", "gradcache.chunk_size=4"]
            first = timed_attempt(base, run_dir, 1)
            again = timed_attempt([*base, f"train.steps={steps + 2}"], run_dir, steps + 1)["first_step_s"] \
                if resume else None
            dim.rows.append({"scale": w, **first, "resume_first_step_s": again})
            print(f"  {w:>2} workers: first step {first['first_step_s']:.1f} s, step {_fmt(first['step_s'])} s, "
                  f"resume {_fmt(again)} s", flush=True)
    finally:
        cluster.shutdown()
    return dim


# ------------------------------------------------------------------------------------------- model
STARTUP_LINE = re.compile(r"start-up: first step done (\d+\.\d) s \((.*)\)")


def startup_phases(lines: list[str]) -> dict[str, float]:
    """The phases of rank 0's `start-up: first step done …` line (seconds), and their total."""
    m = next(m for m in map(STARTUP_LINE.search, reversed(lines)) if m)
    phases = {name: float(sec) for name, sec in re.findall(r"([a-z][a-z ,]*?) (\d+\.\d)", m.group(2))}
    return {**phases, "total": float(m.group(1))}


def peak_by_role(samples: list[dict]) -> dict[str, float]:
    """The largest RSS (MB) any one process of each role reached."""
    out: dict[str, float] = {}
    for s in samples:
        for who, rss in s["rss"].values():
            out[who] = max(out.get(who, 0.0), rss / MB)
    return out


def child_universal(checkpoint: str) -> dict:
    """DeepSpeed's universal conversion of one resume checkpoint, into a scratch folder: seconds, peak RSS."""
    from pipeline.train.engine import convert_to_universal
    before = rss_bytes()
    with tempfile.TemporaryDirectory(prefix="universal-") as out:
        start = time.perf_counter()
        convert_to_universal(checkpoint, out)
        seconds = time.perf_counter() - start
    return {"universal_s": seconds, "universal_peak_mb": (peak_rss_bytes() - before) / MB}


def child_consolidate(model_name: str) -> dict:
    """One rank of a 2-rank ZeRO-3 engine: its RSS growth while `consolidated_state(rank0_only=True)` runs
    (sampled every 2 ms), in full copies of the weights."""
    import torch
    import torch.distributed as dist
    from zero3_memory import RssSampler

    from pipeline.config import load_config
    from pipeline.distributed import get_rank
    from pipeline.models import build_model
    from pipeline.train.engine import Engine, parameter_count

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(None, ["eval.schedule=off", f"model.name={model_name}", "cluster.num_workers=2",
                             "deepspeed.zero_optimization.stage=3", "train.global_batch=4", "data.image_size=224",
                             "train.precision=fp32"])
    torch.manual_seed(0)
    engine = Engine(cfg, build_model(cfg.model, image_size=224, context_length=77, vocab_size=49408), 2)
    weights = parameter_count(engine.module) * 4
    sampler = RssSampler(dict)                      # every 2 ms
    sampler.mark("before")
    state = engine.consolidated_state(rank0_only=True)
    sampler.mark("consolidated")
    sampler.stop()
    before, during = sampler.marks
    rank = get_rank()
    dist.destroy_process_group()
    return {"rank": rank, "copies": (during["peak"] - before["rss"]) / weights, "weights_mb": weights / MB,
            "returned": len(state)}


MODEL_COSTS = [Cost("step_s", "s", 1.0), Cost("checkpoint_s", "s", 1.0), Cost("universal_s", "s", 1.0),
               Cost("resume_s", "s", 1.0), Cost("worker_peak_mb", "MB", 1.0), Cost("resumed_worker_peak_mb", "MB", 1.0)]


def model_dimension(tmp: Path, models: list[str], stages: list[int]) -> list[Dimension]:
    """Per ZeRO stage, each model at 224 px, 2 workers, one gradient-cache step of 4 rows (chunk 2) with a
    checkpoint and its publish; the checkpoint's universal conversion (timed in a process of its own); a
    resume on 1 worker (another world size) to a second step. Scale: parameters."""
    data = synth_data(tmp, samples=32, size=224, shard_size=8, eval_samples=8)   # two rows per worker a step
    dims = []
    for stage in stages:
        dim = Dimension(f"model-zero{stage}", f"parameters (ZeRO {stage})", MODEL_COSTS,
                        extras=["model", "weights_mb", "checkpoint_mb", "universal_peak_mb", "driver_peak_mb"])
        for m in models:
            run_dir = str(tmp / f"model-{m}-z{stage}")
            args = run_job(data, run_dir, 1, 1, 2, 0) + [
                f"model.name={m}", "data.image_size=224", "train.global_batch=4", "gradcache.chunk_size=2",
                f"deepspeed.zero_optimization.stage={stage}", "train.precision=fp32", "data.streams=4"]
            samples: list[dict] = []
            first = Watched(args, run_dir, samples, every_s=0.5)
            first.finish()
            fresh = startup_phases(first.lines)
            saves = [float(m_.group(1)) for m_ in map(CHECKPOINT_LINE.search, first.lines) if m_]
            if not saves:                       # seen once (ViT-L/14): Ray forwards a worker's last lines late
                print(f"  ZeRO {stage} {m}: its 'checkpointed and published' line did not reach the driver's "
                      "output; the checkpoint is measured from its folder, its time is not", flush=True)
            ckpt = os.path.join(run_dir, "checkpoints", step_dir(1))
            params, checkpoint_mb = published_parameters(run_dir, 1), folder_mb(ckpt)
            conversion = run_child("universal", ckpt)
            on_one: list[dict] = []
            resumed = Watched([*args, "train.steps=2", "cluster.num_workers=1"], run_dir, on_one, every_s=0.5)
            resumed.finish()
            again = startup_phases(resumed.lines)
            peaks, resumed_peaks = peak_by_role(samples), peak_by_role(on_one)
            row = {"scale": params, "model": m, "step_s": fresh["first step"], "checkpoint_s": next(iter(saves), None),
                   **conversion, "resume_s": again["deepspeed"], "worker_peak_mb": peaks.get("worker"),
                   "resumed_worker_peak_mb": resumed_peaks.get("worker"),
                   "driver_peak_mb": max(peaks.get("driver", 0), resumed_peaks.get("driver", 0)),
                   "weights_mb": params * 4 / MB,
                   "checkpoint_mb": checkpoint_mb}
            dim.rows.append(row)
            shutil.rmtree(run_dir)                      # ViT-L/14's run holds 17 GB (checkpoints, universal copy)
            print(f"  ZeRO {stage} {m:>9} ({params / 1e6:.1f} M): step {row['step_s']:.1f} s, checkpoint "
                  f"{_fmt(row['checkpoint_s'])} s, universal {row['universal_s']:.1f} s, resume on 1 worker "
                  f"{row['resume_s']:.1f} s, worker peak {row['worker_peak_mb']:.0f} MB (2 workers), "
                  f"{row['resumed_worker_peak_mb']:.0f} MB (the resume on 1)", flush=True)
        dims.append(dim)
    return dims


def consolidation_copies(models: list[str]) -> list[dict]:
    """ZeRO-3's publish: each rank's RSS growth while consolidating, in full copies of the weights."""
    rows = []
    for m in models:
        ranks = run_ranks("consolidate", 2, m)
        rows.append({"model": m, "weights_mb": ranks[0]["weights_mb"],
                     **{f"rank{r['rank']}_copies": r["copies"] for r in ranks}})
        print(f"  ZeRO-3 publish of {m}: rank 0 grows {rows[-1]['rank0_copies']:.2f}, rank 1 "
              f"{rows[-1]['rank1_copies']:.2f} copies of the weights ({ranks[0]['weights_mb']:.0f} MB)", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ main
QUICK = {"shards-local": [10, 100, 1000], "shards-s3": [10, 100], "batch": [256, 1024],
         "model": dict(models=["tiny"], stages=[3]),
         "run": dict(steps=60, every=15, keep=2, eval_every=0, interruptions=0),
         "workers": dict(scales=[1, 2], nodes=2, cpus_per_node=1, steps=4, resume=False)}
FULL = {"shards-local": [10, 1000, 10000, 100000], "shards-s3": [10, 1000, 10000],
        "batch": [1024, 8192, 32768, 65536],
        "model": dict(models=["tiny", "small", "ViT-B-32", "ViT-B-16", "ViT-L-14"], stages=[1, 2, 3]),
        "run": dict(steps=3000, every=100, keep=2, eval_every=500, interruptions=5),
        "workers": dict(scales=[1, 2, 4, 8, 16], nodes=4, cpus_per_node=4)}
DIMENSIONS = ("shards", "batch", "workers", "model", "run")


def model_scales(default: dict, models: Optional[str], zero: Optional[str], ap: argparse.ArgumentParser) -> dict:
    """The model dimension's models and ZeRO stages: the mode's, or those given on the command line."""
    chosen = dict(default)
    if models:
        from pipeline.models import MODEL_NAMES  # imports torch: only when asked
        chosen["models"] = models.split(",")
        unknown = [m for m in chosen["models"] if m not in MODEL_NAMES]
        if unknown:
            ap.error(f"--models {models}: unknown models {unknown}; expected some of {sorted(MODEL_NAMES)}")
    if zero:
        if not all(z in "123" and z for z in zero.split(",")):
            ap.error(f"--zero {zero}: expected ZeRO stages among 1, 2, 3 (comma-separated)")
        chosen["stages"] = [int(z) for z in zero.split(",")]
    return chosen


@contextmanager
def timed(walls: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall seconds of the block as walls[name]."""
    start = time.monotonic()
    yield
    walls[name] = time.monotonic() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small scales of every dimension (about 2.5 minutes)")
    ap.add_argument("--only", default=",".join(DIMENSIONS), help=f"comma-separated subset of {DIMENSIONS}")
    ap.add_argument("--out", default="build/scale", help="folder for the plots and results.json")
    ap.add_argument("--models", help="comma-separated models of the model dimension (default: the mode's)")
    ap.add_argument("--zero", help="comma-separated ZeRO stages of the model dimension (default: the mode's)")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        print(json.dumps(CHILDREN[kind](*rest)))
        return
    only = args.only.split(",")
    unknown = set(only) - set(DIMENSIONS)
    if unknown:
        ap.error(f"--only {args.only}: unknown dimensions {sorted(unknown)}; expected some of {DIMENSIONS}")
    scales = QUICK if args.quick else FULL
    scales = {**scales, "model": model_scales(scales["model"], args.models, args.zero, ap)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dims: list[Dimension] = []
    walls: dict[str, float] = {}
    consolidation, run_checks = None, None
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        if "shards" in only:
            with timed(walls, "shards"):
                dims.append(shards_dimension(scales["shards-local"], "local", Path(tmp), inspect_max=10000))
                server = s3_server()
                if server is None:
                    print("  shards on S3 skipped: moto_server is not installed (pip install 'moto[server]')")
                else:
                    try:
                        dims.append(shards_dimension(scales["shards-s3"], "s3", Path(tmp), inspect_max=0))
                    finally:
                        server.terminate()
        if "batch" in only:
            with timed(walls, "batch"):
                dims.append(batch_dimension(scales["batch"]))
        if "workers" in only:
            with timed(walls, "workers"):
                dims.append(workers_dimension(Path(tmp), **scales["workers"]))
        if "model" in only:
            with timed(walls, "model"):
                dims += model_dimension(Path(tmp), **scales["model"])
                consolidation = consolidation_copies(scales["model"]["models"][-2:])
        if "run" in only:
            with timed(walls, "run"):
                run_dim, run_checks = run_dimension(Path(tmp), **scales["run"])
                dims.append(run_dim)
    for dim in dims:
        print_dimension(dim)
        print(f"  plot: {plot(dim, out)}")
    if run_checks:
        print_run_checks(run_checks)
    results = {d.name: {"scale": d.scale, "rows": d.rows, "verdicts": verdicts(d)} for d in dims}
    if run_checks:
        results["run"]["checks"] = run_checks
    if consolidation:
        results["consolidation"] = consolidation
    results["wall_s"] = walls
    print("\nwall time per dimension: " + ", ".join(f"{n} {t:.0f} s" for n, t in walls.items())
          + f"; total {sum(walls.values()):.0f} s")
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out / 'results.json'}")


CHILDREN: dict[str, Callable[..., dict]] = {
    "shards": lambda url, steps, inspect: child_shards(url, int(steps), inspect == "1"),
    "batch": lambda batch, chunk: child_batch(int(batch), int(chunk)),
    "universal": child_universal,
    "consolidate": child_consolidate,
}

if __name__ == "__main__":
    main()
