"""The curation stage at scale: embedding throughput on 1, 2, 4 Ray Data actors against a plain
single-process loop over the same shards, and `filter`'s peak memory on up to 1 M synthetic embeddings.

embed: a synthetic pool (64 px, the demo's `tiny` model, untrained: throughput does not depend on the
weights), embedded by `embed_shard` in a loop in this process (one torch thread, as each actor has), then
by `contrast embed`'s `embed` on N actors (a local Ray with 4 CPUs). Throughput = samples / wall time of
the call (actor start and model loads included), median of --repeats fresh runs; also the actors' own
samples/s inside shards.

filter: N synthetic embeddings (float16, --dim; 5 % planted exact copies) in files of 10 000 rows; a child
process runs the rules (`--top-fraction 0.7 --dedup 0.95`: `read_pool`, `select`, the decisions file) and
reports its peak RSS, beside what the embeddings would take as float32 and what usearch's index holds.

    flock /tmp/contrast-heavy.lock python benchmarks/curation_scale.py [--quick] [--only embed|filter]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FILE_ROWS = 10_000


# ------------------------------------------------------------------------------------ embed
def make_pool(root: Path, samples: int, shard_size: int) -> tuple[str, str]:
    """Synthetic shards and an untrained `tiny` published checkpoint (64 px)."""
    import torch

    from pipeline.config import Config
    from pipeline.data import load_tokenizer
    from pipeline.data.synth import synthesize
    from pipeline.models import build_model, save_published

    synthesize(str(root / "pool"), samples, eval_samples=8, image_size=64, shard_size=shard_size, workers=2,
               progress=False)
    data = str(root / "pool" / "train")
    tok = load_tokenizer(data, 32)
    cfg = Config()
    cfg.model.name = "tiny"
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=64, context_length=32, vocab_size=tok.vocab_size, loss_name="clip")
    ckpt = str(root / "model" / "published" / "step_00000001")
    save_published(model, tok, ckpt, 1)
    return data, ckpt


def plain_loop(data: str, ckpt: str, out: Path) -> tuple[float, float]:
    """(samples/s of one process embedding every shard in turn, model load included as an actor's is;
    samples/s inside the shards)."""
    import torch

    from pipeline.curate.embed import embed_shard, model_identity
    from pipeline.data import resolve_shards
    from pipeline.models import load_model

    torch.set_num_threads(1)
    started = time.perf_counter()
    published = load_model(ckpt)
    identity = model_identity(ckpt, published)
    results = [embed_shard(published, s, str(out), identity) for s in resolve_shards(data)]
    samples = sum(r.samples for r in results)
    return samples / (time.perf_counter() - started), samples / sum(r.seconds for r in results)


def ray_embed(data: str, ckpt: str, out: Path, workers: int) -> tuple[float, float]:
    """(samples/s of the whole call, median samples/s of an actor inside its shards)."""
    from pipeline.curate import embed

    started = time.perf_counter()
    summary = embed(ckpt, data, str(out), workers=workers, progress=False)
    wall = time.perf_counter() - started
    return summary.samples / wall, statistics.median(summary.throughput().values())


def bench_embed(args: argparse.Namespace, root: Path) -> dict:
    import ray

    data, ckpt = make_pool(root, args.samples, args.shard_size)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows: dict[str, list] = {"plain loop": []}
    for r in range(args.repeats):
        rows["plain loop"].append(plain_loop(data, ckpt, root / f"plain{r}"))
        for w in (1, 2, 4):
            rows.setdefault(f"{w} actor{'s' * (w > 1)}", []).append(ray_embed(data, ckpt, root / f"ray{w}-{r}", w))
    ray.shutdown()
    result = {name: {"samples_per_s": statistics.median(v[0] for v in runs),
                     "per_actor_in_shards": statistics.median(v[1] for v in runs), "runs": runs}
              for name, runs in rows.items()}
    base = result["plain loop"]["samples_per_s"]
    print(f"\nembed: {args.samples} samples in {args.samples // args.shard_size} shards, 64 px, tiny, "
          f"{os.cpu_count()} cores; median of {args.repeats}\n")
    print("| how | samples/s (whole call) | ÷ plain loop | per process, inside shards |")
    print("| --- | --- | --- | --- |")
    for name, v in result.items():
        print(f"| {name} | {v['samples_per_s']:.0f} | {v['samples_per_s'] / base:.2f} | "
              f"{v['per_actor_in_shards']:.0f} |")
    return result


# ------------------------------------------------------------------------------------ filter
def write_embeddings(out: Path, n: int, dim: int) -> None:
    """`n` unit float16 vectors in files of FILE_ROWS rows; 5 % are exact copies of an earlier row."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.curate.embed import META_KEY, embedding_schema

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    previous = None
    for f, start in enumerate(range(0, n, FILE_ROWS)):
        rows = min(FILE_ROWS, n - start)
        v = rng.standard_normal((rows, dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        v = v.astype(np.float16)
        if previous is not None:
            copies = rng.random(rows) < 0.05
            v[copies] = previous[rng.integers(0, len(previous), copies.sum())]
        previous = v
        flat = pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), dim)
        shard = f"synthetic/{f:05d}.tar"
        table = pa.table({"key": [f"{start + i:08d}" for i in range(rows)], "shard": [shard] * rows,
                          "caption": ["a caption"] * rows, "image_emb": flat, "text_emb": flat,
                          "score": rng.random(rows, dtype=np.float32)},
                         schema=embedding_schema(dim).with_metadata(
                             {META_KEY: json.dumps({"shard": shard, "samples": rows}).encode()}))
        pq.write_table(table, out / f"{f:05d}.parquet")


def run_rules(folder: str, decisions: str) -> None:
    """The child: the rules on every file of `folder`; prints its counts, seconds and peak RSS as JSON."""
    from collections import Counter

    import numpy as np

    from pipeline.curate import Rules
    from pipeline.curate.embed import embedding_files
    from pipeline.curate.filter import read_pool, select, write_decisions

    started = time.perf_counter()
    pool = read_pool(embedding_files(folder))
    reason = select(pool, Rules(top_fraction=0.7, dedup=0.95))
    write_decisions(decisions, pool.keys.to_pylist(), pool.shards.to_pylist(), pool.scores, reason)
    print(json.dumps({"pairs": len(pool), "dropped": Counter(map(str, reason[reason != ""])),
                      "kept": int(np.sum(reason == "")), "seconds": time.perf_counter() - started,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def bench_filter(args: argparse.Namespace, root: Path) -> dict:
    result = {}
    for n in args.pairs:
        folder = root / f"emb{n}"
        write_embeddings(folder, n, args.dim)
        child = subprocess.run([sys.executable, __file__, "--child", str(folder), str(root / f"decisions{n}.parquet")],
                               check=True, capture_output=True, text=True)
        result[n] = json.loads(child.stdout.strip().splitlines()[-1])
        shutil.rmtree(folder)
    print(f"\nfilter --top-fraction 0.7 --dedup 0.95, dim {args.dim} (float16), 5 % planted copies\n")
    print("| pairs | peak RSS (MiB) | embeddings as float32 (MiB) | index vectors, float16 (MiB) | seconds | "
          "dropped by dedup |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n, r in result.items():
        print(f"| {n} | {r['peak_rss_mib']:.0f} | {2 * n * args.dim * 4 / 2 ** 20:.0f} | "
              f"{0.7 * n * args.dim * 2 / 2 ** 20:.0f} | {r['seconds']:.0f} | {r['dropped'].get('dedup', 0)} |")
    return result


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        return run_rules(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["embed", "filter"])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=128, help="the tiny model's embedding width")
    parser.add_argument("--quick", action="store_true", help="a small pool, one repeat, 20 000 pairs")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.shard_size, args.repeats, args.pairs = 512, 64, 1, [20_000]
    root = Path(tempfile.mkdtemp(prefix="curation-scale-"))
    try:
        out = {}
        if args.only in (None, "embed"):
            out["embed"] = bench_embed(args, root)
        if args.only in (None, "filter"):
            out["filter"] = bench_filter(args, root)
        print(json.dumps(out, default=str))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
