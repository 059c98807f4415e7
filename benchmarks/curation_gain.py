"""The curation stage's quality gain on the demo: train on a noisy pool, embed and filter it with that
model, retrain from scratch on the filtered shards for the same steps; the table of docs/curation.md.

1. `contrast data synth --noise N --duplicates D`: N of the captions replaced by another scene's caption,
   D of the pairs copies of another pair; `train/planted_noise.json` says which.
2. raw run: the demo config (`configs/demo.yaml`: tiny dual encoder, 2 Ray workers, ZeRO 2, gradient cache)
   on the pool for --steps; its own evaluator scores the last checkpoint.
3. `contrast embed` the pool with the raw run's last checkpoint; `contrast data filter` with
   --top-fraction (default: 1 - N, the planted rate) and --dedup.
4. filtered run: the same config, seed and steps on the filtered shards.

Reported: held-out zero-shot acc@1 and retrieval R@1 (image→text, text→image) of both runs, and per rule
the filter's precision and recall against the planted noise (`planted_scores`). Heavy: run under the
shared lock. A finished step under --out is reused, not done again.

    flock /tmp/contrast-heavy.lock python benchmarks/curation_gain.py [--steps 300] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.curate.quality import filter_quality

CONTRAST = str(Path(sys.executable).with_name("contrast"))
# The planted duplicates are copies of an image: they embed to the same float16 vector, cosine 1 to 1e-15
# (filter recomputes it in float64), while distinct images of an undertrained model come within 5e-6 of 1
# (a 20-step model: median nearest-neighbour cosine 0.9997, max 0.999995). A threshold of 1 - 1e-6 takes the
# copies and only them, whatever the model's training; a semantic threshold (0.95) is a choice for real pools.
EXACT_COPY = 0.999999


def sh(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def train(name: str, train_url: str, args: argparse.Namespace) -> dict:
    """Train and evaluate the demo on `train_url`; returns the last step's eval metrics."""
    run_dir = Path(args.out) / name
    result = run_dir / "eval" / f"step_{args.steps:08d}.json"
    if not result.exists():
        sh(CONTRAST, "-q", "run", "configs/demo.yaml", f"run_dir={run_dir}", f"train.steps={args.steps}",
           f"train.global_batch={args.batch}", f"checkpoint.every_steps={args.steps}",
           f"train.warmup_steps={max(1, args.steps // 15)}", f"data.train_urls=[{train_url}]",
           f"data.eval_dir={args.out}/pool/eval", "eval.schedule=every",
           "eval.sets=[zeroshot_heldout,retrieval]", "logging.progress=false", f"cluster.num_workers={args.workers}")
    return json.loads(result.read_text())["metrics"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--duplicates", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers of each run")
    parser.add_argument("--top-fraction", type=float, help="default: 1 - noise - duplicates")
    parser.add_argument("--dedup", type=float, default=EXACT_COPY,
                        help="image-embedding cosine of --dedup; the default finds copies (see EXACT_COPY)")
    parser.add_argument("--out", default="runs/curation")
    parser.add_argument("--quick", action="store_true", help="a small pool and short runs (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.steps, args.batch, args.workers = 2000, 20, 64, 1
    top = args.top_fraction if args.top_fraction is not None else 1 - args.noise - args.duplicates
    out = Path(args.out)
    started = time.perf_counter()
    pool = out / "pool"
    if not (pool / "train" / "planted_noise.json").exists():
        sh(CONTRAST, "-q", "data", "synth", "--out", str(pool), "--samples", str(args.samples),
           "--noise", str(args.noise), "--duplicates", str(args.duplicates), "--workers", "2",
           "--eval-samples", "1000")
    raw = train("raw", str(pool / "train"), args)
    model = out / "raw" / "published" / f"step_{args.steps:08d}"
    emb, curated = out / "embeddings", out / "curated"
    sh(CONTRAST, "-q", "embed", str(model), str(pool / "train"), "--out", str(emb), "--workers", "1",
       "--auth", "disabled")
    if not (curated / "manifest.json").exists():
        sh(CONTRAST, "-q", "data", "filter", str(emb), "--out", str(curated), "--top-fraction", str(top),
           "--dedup", str(args.dedup))
    filtered = train("filtered", str(curated), args)
    quality = filter_quality(curated / "decisions.parquet", pool / "train" / "planted_noise.json")
    rows = {"raw": raw, "filtered": filtered}
    summary = {"args": vars(args), "top_fraction": top, "runs": rows, "filter": quality,
               "seconds": time.perf_counter() - started}
    (out / "curation_gain.json").write_text(json.dumps(summary, indent=1))
    print(f"\npool: {args.samples} pairs, {args.noise:.0%} captions swapped, {args.duplicates:.0%} duplicated; "
          f"filter --top-fraction {top:.2f} --dedup {args.dedup}; {args.steps} steps × {args.batch}\n")
    print("| run | pairs | held-out zero-shot acc@1 | retrieval R@1 i→t / t→i |")
    print("| --- | --- | --- | --- |")
    kept = quality["kept"]
    for name, m in rows.items():
        pairs = args.samples if name == "raw" else kept
        print(f"| {name} | {pairs} | {m['zeroshot_heldout/acc1']:.3f} | {m['retrieval/image_to_text_R@1']:.3f} / "
              f"{m['retrieval/text_to_image_R@1']:.3f} |")
    gain = filtered["zeroshot_heldout/acc1"] - raw["zeroshot_heldout/acc1"]
    print(f"\nfiltered − raw, held-out acc@1: {100 * gain:+.1f} points (goal ≥ +5)\n")
    print("| rule | planted | dropped | precision | recall |")
    print("| --- | --- | --- | --- | --- |")
    for rule, q in quality["rules"].items():
        print(f"| {rule} (vs {q['against']}) | {q['planted']} | {q['dropped']} | {q['precision']:.3f} | "
              f"{q['recall']:.3f} |")


if __name__ == "__main__":
    main()
