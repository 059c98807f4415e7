"""Start-up, teardown and memory of `contrast train` vs a plain torchrun + DDP loop of the same job,
and, when open_clip's side venv exists, vs open_clip's own trainer.

The sides train the same model on the same shards with the same step, 2 processes on CPU:

  ours   `contrast train CONFIG`: a local Ray, Ray Train's TorchTrainer, 2 workers running the train
         loop (DeepSpeed ZeRO 2, the gradient cache, TensorBoard every step, a resume checkpoint and
         published weights at the last step).
  plain  `torchrun --nproc_per_node 2 benchmarks/startup.py --plain-worker CONFIG`: a gloo group,
         the same dual encoder wrapped in DDP, torch AdamW, the same data stream and gradient-cache
         step (`forward_backward` with DDP's no_sync), rank 0 saving the weights at the end.
  open_clip  (optional) `torchrun --standalone --nproc_per_node 2 benchmarks/startup_open_clip.py ...` in
         the side venv of `../shared/tools/make-open-clip-venv.sh` (`--open-clip-venv`): open_clip's
         trainer (`open_clip_train.main`) with gloo on CPU, fp32, an open_clip model config of our
         "tiny" (same widths, layers, heads, patch, embedding; 64 px, context 32, our vocabulary) and
         our tokenizer (the shards' tokenizer.json, as an HF tokenizer folder), `--accum-freq 4` of
         micro-batches of 32 (its gradient cache: 128 per process), lr 1e-3, warmup 2, 1 epoch of
         exactly --steps steps, a log line every step and its checkpoint at the end. Skipped, with a
         line saying why, when the venv's python is missing or cannot import tv_shim_hook, open_clip_train.
         Not identical jobs: open_clip reads the shards with its own webdataset pipeline, shuffle
         buffers and train transforms, all-reduces at every micro-batch's backward (no no_sync), and
         its checkpoint holds the optimizer state too; only start-up, teardown and memory are compared.

Per run, measured from outside (the launch is t = 0):
  first step   when step 1 ended: the wall time of the first `train/loss` event in TensorBoard
               (ours), the time the plain loop prints (plain), the end of the first optimizer step
               as the open_clip wrapper's step hook recorded it (open_clip)
  teardown     from the end of the last step to the exit of the launched command
  peak RSS     of the whole process tree (the launcher, Ray's processes, every worker), sampled
               every 0.2 s with psutil; also the peak PSS (shared pages split between the
               processes that map them, so shared libraries count once), sampled every 2 s only:
               reading it costs ~15 ms of CPU per process
  CPU          user + system seconds of every process of the tree (last sample of each)
Runs alternate ours / plain / open_clip (a shared machine's load drifts); medians and ratios are printed.
One untimed run of each side comes first (DeepSpeed's C++ op may need building once).

    python benchmarks/startup.py [--repeats 3] [--steps 5] [--data DIR] [--open-clip-venv DIR]
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ENV = {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0"}
PLAIN_MARK = "plain-loop-marks "
OPEN_CLIP_MARK = "open-clip-marks "              # printed by benchmarks/startup_open_clip.py
OPEN_CLIP_WORKER = Path(__file__).with_name("startup_open_clip.py")
OPEN_CLIP_MODEL = "contrast-tiny"                # the name of the model config JSON written for open_clip
BIN = Path(sys.executable).parent


def job_config(data: str, run_dir: str, steps: int) -> dict:
    """The demo's job, shortened: tiny model, 64 px, global batch 256 over 2 workers, chunks of 32."""
    return {
        "run_dir": run_dir, "seed": 0,
        "data": {"train_urls": [data], "image_size": 64, "context_length": 32, "num_workers": 0,
                 "shuffle_buffer": 500},
        "model": {"name": "tiny"}, "loss": {"name": "clip"},
        "train": {"steps": steps, "global_batch": 256, "lr": 1e-3, "warmup_steps": 2, "log_every": 1},
        "gradcache": {"chunk_size": 32},
        "deepspeed": {"zero_optimization": {"stage": 2}},
        "cluster": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": steps},
        "eval": {"schedule": "off"}, "logging": {"progress": False},
    }


# ----------------------------------------------------------------------------- the plain loop
def plain_worker(config_path: str) -> None:
    """One torchrun process: the job of `config_path` with DDP and torch AdamW; rank 0 prints marks."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    from pipeline.config import load_config
    from pipeline.data import open_train_stream
    from pipeline.gradcache import forward_backward
    from pipeline.losses import get_loss
    from pipeline.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(config_path)
    stream = open_train_stream(cfg, rank=rank, world_size=world)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                        vocab_size=stream.tokenizer.vocab_size, loss_name=cfg.loss.name).train()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = get_loss(cfg.loss.name)
    marks = []
    for _, batch in zip(range(cfg.train.steps), stream):
        forward_backward(ddp, batch["image"], batch["text"], loss_fn, chunk_size=cfg.gradcache.chunk_size)
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append(time.time())
    if rank == 0:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(cfg.run_dir, "model.safetensors"))
        print(PLAIN_MARK + json.dumps({"first": marks[0], "last": marks[-1]}), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------------- open_clip's trainer
def open_clip_env() -> dict[str, str]:
    """The side venv's environment: ours, less PYTHONPATH (the project's packages stay out of it)."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, **ENV}


def open_clip_unusable(venv: Path) -> str | None:
    """Why open_clip's side venv at `venv` cannot run the open_clip side, or None when it can."""
    python = venv / "bin" / "python"
    if not python.exists():
        return f"no {python} (build it with ../shared/tools/make-open-clip-venv.sh)"
    if not (venv / "bin" / "torchrun").exists():
        return f"no {venv / 'bin' / 'torchrun'}"
    check = subprocess.run([str(python), "-c", "import tv_shim_hook, open_clip_train"], capture_output=True,
                           text=True, env=open_clip_env())
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return f"`import tv_shim_hook, open_clip_train` fails there: {last}"
    return None


def open_clip_job(data: str, run_dir: str, steps: int) -> list[str]:
    """Arguments of the open_clip worker for the job of `job_config`: the folder of our "tiny" as an
    open_clip model config and the file of open_clip's command line (a JSON list), written under
    `run_dir` with the shards' tokenizer as an HF tokenizer folder.

    open_clip's `--batch-size` is the micro-batch of its gradient accumulation (which, like our gradient
    cache, re-runs each micro-batch's forward against the cached features of the others): 32 x
    `--accum-freq 4` = 128 per process, 256 global, so `--train-num-samples` 256 x steps is exactly
    `steps` optimizer steps in its 1 epoch."""
    from tokenizers import Tokenizer as HFTokenizer

    from pipeline.data import Tokenizer
    from pipeline.models.configs import NAMED_SPECS
    from pipeline.models.convert import Architecture, open_clip_model_cfg
    from pipeline.models.export import write_hf_tokenizer_config

    job = job_config(data, run_dir, steps)
    image_size, context_length = job["data"]["image_size"], job["data"]["context_length"]
    processes, global_batch = job["cluster"]["num_workers"], job["train"]["global_batch"]
    chunk = job["gradcache"]["chunk_size"]
    tok_dir, config_dir = Path(run_dir, "tokenizer"), Path(run_dir, "model_configs")
    tok_dir.mkdir()
    config_dir.mkdir()
    hf_tok = HFTokenizer.from_file(str(Path(data, "tokenizer.json")))
    tok = Tokenizer(hf_tok, context_length)
    hf_tok.save(str(tok_dir / "tokenizer.json"))
    write_hf_tokenizer_config(tok, context_length, tok_dir)         # as `contrast export --format open_clip`
    model_cfg = open_clip_model_cfg(Architecture(NAMED_SPECS[job["model"]["name"]], image_size, context_length,
                                                 tok.vocab_size), hf_tokenizer=True)
    model_cfg["text_cfg"]["hf_tokenizer_name"] = str(tok_dir)
    (config_dir / f"{OPEN_CLIP_MODEL}.json").write_text(json.dumps(model_cfg, indent=1))
    shards = sorted(str(s) for s in Path(data).glob("*.tar"))
    args = ["--model", OPEN_CLIP_MODEL, "--train-data", "::".join(shards), "--dataset-type", "webdataset",
            "--train-num-samples", str(global_batch * steps), "--batch-size", str(chunk),
            "--accum-freq", str(global_batch // processes // chunk), "--epochs", "1",
            "--lr", str(job["train"]["lr"]), "--warmup", str(job["train"]["warmup_steps"]),
            "--wd", "0.2",                                                # our train.weight_decay's default
            "--seed", str(job["seed"]), "--precision", "fp32", "--workers", "0",
            "--device", "cpu", "--dist-backend", "gloo", "--log-every-n-steps", "1", "--save-frequency", "1",
            "--report-to", "", "--logs", str(Path(run_dir, "logs")), "--name", "run"]
    args_file = Path(run_dir, "open_clip_args.json")
    args_file.write_text(json.dumps(args, indent=1))
    return [str(config_dir), str(args_file)]


def open_clip_marks(output: str) -> tuple[float, float]:
    """The end of the first and last optimizer steps, as the open_clip worker printed them."""
    found = re.search(re.escape(OPEN_CLIP_MARK) + r"(\{[^{}]*\})", output)   # rank 1's logs share the pipe
    if found is None:
        raise RuntimeError(f"no {OPEN_CLIP_MARK!r} line in the open_clip side's output:\n{output[-3000:]}")
    marks = json.loads(found.group(1))
    return marks["first"], marks["last"]


# ---------------------------------------------------------------------------- measuring a run
class TreeSampler(threading.Thread):
    """Peak RSS and PSS of a process and all its descendants, and their CPU seconds."""

    def __init__(self, pid: int, every_s: float = 0.2, pss_every: int = 10):
        super().__init__(daemon=True)
        self.root, self.every_s, self.pss_every = psutil.Process(pid), every_s, pss_every
        self.peak_rss = self.peak_pss = 0
        self.cpu: dict[int, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        for tick in itertools.count():
            if self.done.is_set():
                return
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            with_pss = tick % self.pss_every == 0
            rss = pss = 0
            for p in procs:
                try:
                    rss += p.memory_info().rss
                    pss += p.memory_full_info().pss if with_pss else 0
                    times = p.cpu_times()
                except psutil.Error:
                    continue
                self.cpu[p.pid] = times.user + times.system
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.done.wait(self.every_s)


def measure(cmd: list[str], env: dict[str, str], marks_of) -> tuple[dict[str, float], str]:
    """Run `cmd`; `marks_of(output)` gives the epoch times of the end of the first and last steps.
    Returns the figures and the command's output."""
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    sampler = TreeSampler(proc.pid)
    sampler.start()
    output, _ = proc.communicate()
    end = time.time()
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    first, last = marks_of(output)
    return {"first_step_s": first - start, "teardown_s": end - last,
            "start_plus_teardown_s": first - start + end - last, "total_s": end - start,
            "peak_rss_gib": sampler.peak_rss / 2**30, "peak_pss_gib": sampler.peak_pss / 2**30,
            "cpu_s": sum(sampler.cpu.values())}, output


def tensorboard_marks(run_dir: str):
    """The wall times of the first and last `train/loss` events of a run."""
    def marks(_output: str) -> tuple[float, float]:
        from pipeline.eval.report import read_scalar_events
        times = sorted(event.wall_time for event in read_scalar_events(run_dir)["train/loss"])
        return times[0], times[-1]
    return marks


def plain_marks(output: str) -> tuple[float, float]:
    """The end of the first and last steps, as the plain loop printed them."""
    line = next(x for x in output.splitlines() if x.startswith(PLAIN_MARK))
    marks = json.loads(line[len(PLAIN_MARK):])
    return marks["first"], marks["last"]


def run_side(side: str, data: str, tmp: str, steps: int, index: int,
             open_clip_venv: Path | None = None) -> tuple[dict[str, float], str]:
    """One measured run of `side` (ours, plain, open_clip) in a fresh run folder under `tmp`."""
    import yaml
    run_dir = os.path.join(tmp, f"{side}-{index}")
    os.makedirs(run_dir)
    if side == "open_clip":
        assert open_clip_venv is not None
        return measure([str(open_clip_venv / "bin" / "torchrun"), "--standalone", "--nproc_per_node", "2",
                        str(OPEN_CLIP_WORKER), *open_clip_job(data, run_dir, steps)],
                       open_clip_env(), open_clip_marks)
    config = os.path.join(run_dir, "config.yaml")
    Path(config).write_text(yaml.safe_dump(job_config(data, run_dir, steps)))
    env = {**os.environ, **ENV, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent.parent),
                                                                          os.environ.get("PYTHONPATH")]))}
    if side == "ours":
        return measure([str(BIN / "contrast"), "train", config], env, tensorboard_marks(run_dir))
    return measure([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", __file__, "--plain-worker",
                    config], env, plain_marks)


# ------------------------------------------------------------------------------------- main
ROWS = [("first_step_s", "launch → end of step 1", "s"), ("teardown_s", "end of last step → exit", "s"),
        ("start_plus_teardown_s", "start-up + teardown", "s"), ("total_s", "whole command", "s"),
        ("peak_rss_gib", "peak RSS, process tree", "GiB"), ("peak_pss_gib", "peak PSS, process tree", "GiB"),
        ("cpu_s", "CPU time, process tree", "s")]


def main() -> None:
    """Measure the sides (ours, plain, open_clip when its venv works) alternately and print the medians."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--data", help="a synthetic dataset's train folder (default: synthesise 4096 samples)")
    p.add_argument("--json", help="also write the medians here")
    p.add_argument("--open-clip-venv", type=Path, default=Path.home() / ".cache" / "open-clip-venv",
                   help="open_clip's side venv (../shared/tools/make-open-clip-venv.sh; default %(default)s); "
                        "the open_clip column appears only when it works")
    p.add_argument("--plain-worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain_worker:
        plain_worker(args.plain_worker)
        return
    sides = ["ours", "plain"]
    why_not = open_clip_unusable(args.open_clip_venv)
    if why_not is None:
        sides.append("open_clip")
    else:
        print(f"open_clip column skipped: {why_not}", flush=True)
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as tmp:
        data = args.data
        if data is None:
            from pipeline.data import synthesize
            synthesize(tmp + "/synth", 4096, eval_samples=8, image_size=64, shard_size=512, progress=False)
            data = tmp + "/synth/train"
        for side in sides:
            run_side(side, data, tmp, args.steps, -1, args.open_clip_venv)     # warm-up: builds, page cache
        results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
        lines = []
        for i in range(args.repeats):
            for side in sides:
                figures, output = run_side(side, data, tmp, args.steps, i, args.open_clip_venv)
                results[side].append(figures)
                if side == "ours":
                    lines += re.findall(r"start-up: .*", output)
                print(f"  run {i} {side:9s} " + "  ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    med = {side: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for side, runs in results.items()}
    print(f"\n2 processes, tiny model, global batch 256, gradient cache chunk 32, {args.steps} steps, CPU; "
          f"medians of {args.repeats}")
    open_clip = "open_clip" in med
    header = f"{'':34s} {'ours':>8s} {'plain':>8s} {'ours/pl' if open_clip else 'ratio':>7s}"
    print(header + (f" {'open_clip':>9s} {'ours/oc':>7s}" if open_clip else ""))
    for key, label, unit in ROWS:
        ours, plain = med["ours"][key], med["plain"][key]
        row = f"{label + ' (' + unit + ')':34s} {ours:8.2f} {plain:8.2f} {ours / plain:7.2f}"
        if open_clip:
            oc = med["open_clip"][key]
            row += f" {oc:9.2f} {ours / oc:7.2f}"
        print(row)
    print("\nour start-up, as the last run logged it:\n  " + (lines[-1] if lines else "(no start-up line)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"medians": med, "runs": results, "startup_lines": lines,
                                               "open_clip_skipped": why_not}, indent=1))


if __name__ == "__main__":
    main()
