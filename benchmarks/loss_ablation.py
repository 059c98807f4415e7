"""Loss family II against clip on the demo (synthetic shapes), at equal steps: the table of
docs/losses-family-ii.md.

Each loss trains the demo config (`configs/demo.yaml`: tiny dual encoder, 2 Ray workers, ZeRO 2, gradient
cache) from the same seed for the same number of steps; the run's own evaluator scores the final
checkpoint. Reported per loss: held-out zero-shot acc@1 (classes never captioned in training), retrieval
image→text and text→image R@1, Wang & Liu's uniformity (mean of the two modalities) and tolerance from the
last logged training window, and the median step time (TensorBoard `perf/step_time_s`, the first window
dropped). Heavy (two Ray workers per loss): run it under the shared lock.

    flock /tmp/contrast-heavy.lock python benchmarks/loss_ablation.py [--steps 60] [--losses clip cacr]

`--captions K` synthesises K phrasings per training sample (`data.synth.captions`); a loss that takes several
captions (polyview) then trains on K per row (`data.captions_per_image: K`), the others on one line drawn per
step. Use its own --out: the data differ.

`--set KEY=VALUE ...` adds config overrides to every loss of the invocation (e.g. isogclr's
`loss.temperatures.tau_init=0.07`) and `--tag NAME` names their run folders `LOSS-NAME`, so settings of one
loss share an --out (and its synthesised data) without reusing each other's runs.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

# what a loss needs besides its name (cacr: its scale is a fixed temperature; isogclr: unused)
EXTRA = {"cacr": ["loss.learn_temperature=false"], "isogclr": ["loss.learn_temperature=false"]}
SEVERAL = {"polyview"}            # losses that take data.captions_per_image > 1
LOG_EVERY = 10


def result_file(run_dir: Path, steps: int) -> Path:
    return run_dir / "eval" / f"step_{steps:08d}.json"


def run(loss: str, args: argparse.Namespace) -> Path:
    """Train (and evaluate) `loss`; a finished run of it under --out is reused, not trained again."""
    run_dir = Path(args.out) / (f"{loss}-{args.tag}" if args.tag else loss)
    if result_file(run_dir, args.steps).exists():
        return run_dir
    data = Path(args.out) / "data"
    overrides = [f"run_dir={run_dir}", f"loss.name={loss}", f"train.steps={args.steps}",
                 f"train.global_batch={args.batch}", f"checkpoint.every_steps={args.steps}",
                 f"train.warmup_steps={max(1, args.steps // 10)}", f"train.log_every={LOG_EVERY}",
                 f"data.train_urls=[{data}/train]", f"data.eval_dir={data}/eval",
                 f"data.synth.samples={args.samples}", "eval.schedule=every",
                 "eval.sets=[zeroshot_heldout,retrieval]", "logging.progress=false", *EXTRA.get(loss, []),
                 f"data.synth.captions={args.captions}", *args.set]
    if loss in SEVERAL:
        overrides.append(f"data.captions_per_image={args.captions}")
    contrast = Path(sys.executable).with_name("contrast")
    subprocess.run([str(contrast), "run", "configs/demo.yaml", *overrides], check=True)
    return run_dir


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """The run's training scalars by tag, {step: value} (isogclr's temperature histograms are not scalars)."""
    from pipeline.eval.report import read_scalars
    return {tag: dict(points) for tag, points in read_scalars(str(run_dir)).items()}


def last(series: dict[str, dict[int, float]], suffix: str) -> float:
    tags = [t for t in series if t.endswith(suffix) and "eval" not in t]
    if not tags:
        return float("nan")
    values = series[tags[0]]
    return values[max(values)]


def row(loss: str, run_dir: Path, steps: int) -> dict[str, float]:
    metrics = json.loads(result_file(run_dir, steps).read_text())["metrics"]
    s = scalars(run_dir)
    times = s["perf/step_time_s"]
    window = [times[k] for k in sorted(times) if k > LOG_EVERY] or list(times.values())

    def pick(key: str) -> float:
        return float(metrics.get(key, float("nan")))
    return {"loss": loss, "zeroshot_heldout_acc1": pick("zeroshot_heldout/acc1"),
            "retrieval_i2t_R1": pick("retrieval/image_to_text_R@1"),
            "retrieval_t2i_R1": pick("retrieval/text_to_image_R@1"),
            "uniformity": 0.5 * (last(s, "uniformity_image") + last(s, "uniformity_text")),
            "tolerance": last(s, "tolerance"), "step_time_s": statistics.median(window),
            "eval_keys": sorted(metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--losses", nargs="+", default=["clip", "cacr"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--captions", type=int, default=1, help="phrasings per training sample (polyview: all)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every loss")
    parser.add_argument("--tag", default="", help="run folders are LOSS-TAG (settings sharing an --out)")
    args = parser.parse_args()
    rows = [row(loss, run(loss, args), args.steps) for loss in args.losses]
    Path(args.out, f"ablation{'-' + args.tag if args.tag else ''}.json").write_text(json.dumps(rows, indent=1))
    base = rows[0]["step_time_s"]
    print("| loss | held-out zero-shot acc@1 | retrieval R@1 i→t / t→i | uniformity | tolerance | step time (× clip) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| `{r['loss']}` | {r['zeroshot_heldout_acc1']:.3f} | {r['retrieval_i2t_R1']:.3f} / "
              f"{r['retrieval_t2i_R1']:.3f} | {r['uniformity']:.3f} | {r['tolerance']:.3f} | "
              f"{r['step_time_s']:.2f} s ({r['step_time_s'] / base:.2f}×) |")


if __name__ == "__main__":
    main()
