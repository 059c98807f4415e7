"""LAION's CLIP_benchmark reads our eval sets as they are and agrees with `contrast eval`.

A published checkpoint (a short `contrast run configs/demo.yaml`, or --checkpoint) is evaluated twice
on the eval sets that `contrast data synth` writes (CLIP_benchmark's local WebDataset layout):

- by `contrast eval` (our reader, our preprocessing, our tokenizer);
- by CLIP_benchmark (`clip_benchmark eval --model local-dir:OC --pretrained none --dataset wds/SET
  --dataset_root SETDIR`, fp32) on the `contrast export --format open_clip` folder, in a side venv with
  open_clip and CLIP_benchmark (`--side-python`; `tv_shim_hook` is imported first where it exists, for
  machines whose only torchvision wheel is a CUDA build).

The other way round, `zeroshot_heldout` is re-written by CLIP_benchmark's own converter
(`webdataset_builder.convert_dataset`: lossless WebP, its keys, several shards) and both evaluate that copy.

Printed: each metric both ways and the difference. Zero-shot sets are compared on acc@1, acc@5 and mean
per-class recall, the retrieval set on recall@1/5/10 both ways (CLIP_benchmark's "image retrieval" is our
text→image); the relation set is read by CLIP_benchmark as a retrieval set (it ignores our KEY.json with
the swapped caption), so its recalls are printed without a counterpart.

Then sample by sample, for each zero-shot set: CLIP_benchmark's own classifier and `run_classification` on
the export give logits (scale 100) for every image, in fp32 and with its default autocast (`amp`, which on
CPU computes in bfloat16); against `contrast eval`'s logits the script prints the largest logit
difference, how many predictions differ, and the top-2 margin of each differing prediction and the
smallest margin of the set: in fp32 a prediction can only differ where that margin is below the largest
logit difference. The exit code is 1 when an fp32 prediction differs, or an fp32 zero-shot acc@1 differs by
more than --tolerance (0 by default), or open_clip does not take the folder's own tokenizer (the export
declares it). It skips (exit 0) when the side python cannot import CLIP_benchmark.

    python benchmarks/clip_benchmark_agreement.py [--checkpoint RUN/published/step_N] [--steps 150]
        [--side-python ~/.cache/open-clip-venv/bin/python] [--work DIR] [--json results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIDE_PYTHON = Path.home() / ".cache" / "open-clip-venv" / "bin" / "python"
ZEROSHOT_SETS = ("zeroshot_heldout", "zeroshot_seen")
RETRIEVAL_SETS = ("retrieval", "relation")
KS = (1, 5, 10)
CONVERTED = "heldout_cb_written"    # zeroshot_heldout re-written by CLIP_benchmark's converter


# ------------------------------------------------------------------ the judge (runs in the side venv)
def _shim() -> None:
    """Make a CUDA-only torchvision wheel importable beside a CPU torch (before open_clip or torchvision),
    where the side venv has the hook."""
    try:
        import tv_shim_hook  # noqa: F401
    except ImportError:
        pass


def judge(argv: list[str]) -> None:
    """Run CLIP_benchmark's own CLI with `argv`, after the two fixes this machine needs."""
    _shim()
    import torch
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    def accuracy(output, target, topk=(1,)):
        """CLIP_benchmark's top-k accuracy without float() of a 1-element array (a TypeError in numpy 2.4)."""
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]

    zeroshot_classification.accuracy = accuracy
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sys.argv = ["clip_benchmark", *argv]
    cli.main()


def judge_convert(src_set: str, out: str, max_count: int) -> None:
    """Re-write the test split of one of our zero-shot sets with CLIP_benchmark's own converter (lossless
    WebP, keys s0000000, `max_count` samples a shard), as a user of CLIP_benchmark would make a set."""
    import io
    import tarfile

    _shim()
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset
    from PIL import Image

    class Listed(list):
        """(PIL image, label) pairs with the .classes and .templates the converter writes out."""

    src = Path(src_set)
    samples: dict[str, dict[str, bytes]] = {}
    for i in range(int((src / "test" / "nshards.txt").read_text())):
        with tarfile.open(src / "test" / f"{i}.tar") as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    dataset = Listed((Image.open(io.BytesIO(s["jpg"])).convert("RGB"), int(s["cls"])) for s in samples.values())
    dataset.classes = (src / "classnames.txt").read_text().splitlines()
    dataset.templates = (src / "zeroshot_classification_templates.txt").read_text().splitlines()
    convert_dataset(dataset, "test", out, transform=PIL_to_bytes("webp"), image_format="webp", max_count=max_count,
                    verbose=False)


def judge_tokenizer(model_dir: str) -> str:
    """The class of the tokenizer open_clip gives the exported folder."""
    _shim()
    import open_clip

    return type(open_clip.get_tokenizer(f"local-dir:{model_dir}")).__name__


def judge_logits(model_dir: str, set_dir: str, out: str, amp: bool) -> None:
    """CLIP_benchmark's zero-shot path on the export (its dataset reader, open_clip's preprocessing and
    tokenizer, its classifier and `run_classification`, autocast as its `--amp`): logits and labels, .npy."""
    _shim()
    import open_clip
    import torch
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zc

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    dataset = build_dataset(f"wds/{Path(set_dir).name}", root=set_dir, transform=preprocess, split="test")
    loader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None, num_workers=0)
    classifier = zc.zero_shot_classifier(model.eval(), tokenizer, dataset.classes, dataset.templates, "cpu", amp=amp)
    logits, labels = zc.run_classification(model, classifier, loader, "cpu", amp=amp)
    np.save(out, logits.float().numpy())
    np.save(out + ".labels.npy", labels.numpy())


# ------------------------------------------------------------------ the driver (runs in the project venv)
def contrast(*args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"contrast {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def side(python: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "benchmarks")}
    return subprocess.run([str(python), *args], capture_output=True, text=True, env=env)


def train_checkpoint(work: Path, steps: int, samples: int, eval_samples: int) -> str:
    """A short demo run (no scheduled eval); returns its last published checkpoint."""
    synth = work / "synth"
    contrast("-q", "run", "configs/demo.yaml", f"run_dir={work / 'run'}", f"data.train_urls=[{synth / 'train'}]",
             f"data.eval_dir={synth / 'eval'}", f"data.synth.samples={samples}",
             f"data.synth.eval_samples={eval_samples}", "data.synth.shard_size=250", f"train.steps={steps}",
             f"checkpoint.every_steps={steps}", "eval.schedule=off", "logging.progress=false")
    return str(sorted((work / "run" / "published").glob("step_*"))[-1])


def contrast_eval(checkpoint: str, eval_dir: Path, sets: list[str], work: Path) -> dict[str, float]:
    """`contrast eval` on the sets; its result file's metrics."""
    cfg = work / "eval.yaml"
    cfg.write_text(json.dumps({"data": {"eval_dir": str(eval_dir)}, "eval": {"sets": sets, "batch_size": 64}}))
    printed = contrast("-q", "eval", checkpoint, "--config", str(cfg))
    result = printed.strip().splitlines()[-1].removeprefix("result: ")
    return json.loads(Path(result).read_text())["metrics"]


def our_logits(checkpoint: str, eval_dir: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """`contrast eval`'s zero-shot path (its reader, transform, tokenizer, class embeddings): logits at scale
    100, as CLIP_benchmark's, and the labels."""
    import torch

    from pipeline.eval import metrics
    from pipeline.eval.sets import open_eval_set
    from pipeline.eval.tasks import Encoder, class_labels
    from pipeline.models import load_published

    encoder = Encoder(load_published(checkpoint), 64)
    eval_set = open_eval_set(str(eval_dir), name)
    samples = list(eval_set.samples())
    prompts = [t.replace("{c}", c) for c in eval_set.classnames for t in eval_set.templates]
    with torch.no_grad():
        classes = metrics.class_embeddings(encoder.texts(prompts), len(eval_set.classnames))
        logits = 100 * encoder.images(s.image for s in samples) @ classes.T
    return logits.numpy(), class_labels(eval_set, samples).numpy()


def sample_agreement(ours: tuple, theirs: tuple) -> dict[str, Any]:
    """Sample by sample: the largest logit difference, the predictions that differ with their top-2 margin
    (in our logits), and the set's smallest margin."""
    (a, labels), (b, their_labels) = ours, theirs
    if not (labels == their_labels).all():
        sys.exit("CLIP_benchmark read the samples in another order or with other labels")
    top2 = np.sort(a, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    differ = np.nonzero(a.argmax(1) != b.argmax(1))[0]
    return {"samples": len(labels), "max_logit_diff": float(np.abs(a - b).max()), "differ": len(differ),
            "margins_of_differing": sorted(float(m) for m in margin[differ]), "smallest_margin": float(margin.min()),
            "acc1_ours": float((a.argmax(1) == labels).mean()), "acc1_theirs": float((b.argmax(1) == labels).mean())}


def judged(python: Path, call: str) -> str:
    """The stdout of `call` (an expression on this module) run in the side venv; exits on failure."""
    run = side(python, "-c", f"import clip_benchmark_agreement as a; print(a.{call})")
    if run.returncode:
        sys.exit(f"side venv: {call[:80]} failed:\n{run.stderr[-3000:]}")
    return run.stdout


def clip_benchmark(python: Path, model_dir: Path, set_dir: Path, task: str, work: Path) -> dict[str, float]:
    out = work / f"cb_{set_dir.parent.name}_{set_dir.name}.json"
    args = ["eval", "--model", f"local-dir:{model_dir}", "--pretrained", "none", "--task", task,
            "--dataset", f"wds/{set_dir.name}", "--dataset_root", str(set_dir), "--output", str(out),
            "--batch_size", "64", "--num_workers", "0", "--no_amp", "--recall_k", *map(str, KS)]
    judged(python, f"judge({args!r})")
    return json.loads(out.read_text())["metrics"]


def local_copy(checkpoint: str, work: Path) -> str:
    """The checkpoint copied under work/run/published, so that `contrast eval` writes its results there."""
    dest = work / "run" / "published" / Path(checkpoint).name
    if not dest.exists():
        shutil.copytree(checkpoint, dest)
    return str(dest)


def compare(ours: dict[str, float], theirs: dict[str, dict[str, float]]) -> list[tuple[str, float, float]]:
    """(name, contrast eval, CLIP_benchmark) for every metric both compute."""
    rows = []
    for name in [*ZEROSHOT_SETS, CONVERTED]:
        for metric in ("acc1", "acc5", "mean_per_class_recall"):
            if f"{name}/{metric}" in ours and metric in theirs[name]:
                rows.append((f"{name}/{metric}", ours[f"{name}/{metric}"], theirs[name][metric]))
    for k in KS:
        rows.append((f"retrieval/image_to_text_R@{k}", ours[f"retrieval/image_to_text_R@{k}"],
                     theirs["retrieval"][f"text_retrieval_recall@{k}"]))
        rows.append((f"retrieval/text_to_image_R@{k}", ours[f"retrieval/text_to_image_R@{k}"],
                     theirs["retrieval"][f"image_retrieval_recall@{k}"]))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="a published checkpoint (default: train one with a short demo run)")
    ap.add_argument("--steps", type=int, default=150, help="training steps of the demo run (default 150)")
    ap.add_argument("--samples", type=int, default=8000, help="training samples synthesised (default 8000)")
    ap.add_argument("--eval-samples", type=int, default=500, help="samples per eval set (default 500)")
    ap.add_argument("--side-python", type=Path, default=Path(os.environ.get("OPEN_CLIP_PYTHON", SIDE_PYTHON)))
    ap.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    ap.add_argument("--tolerance", type=float, default=0.0, help="largest fp32 zero-shot acc@1 difference allowed")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    probe = side(args.side_python, "-c", "import clip_benchmark_agreement as a; a._shim(); import clip_benchmark") \
        if args.side_python.exists() else None
    if probe is None or probe.returncode:
        print(f"skipped: CLIP_benchmark is not importable by {args.side_python} (a venv with open_clip_torch and "
              "clip-benchmark; pass it with --side-python or OPEN_CLIP_PYTHON)")
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="cb-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.checkpoint:
        checkpoint = local_copy(args.checkpoint, work)
        contrast("-q", "data", "synth", "--out", str(work / "synth"), "--samples", "64",
                 "--eval-samples", str(args.eval_samples))
    else:
        checkpoint = train_checkpoint(work, args.steps, args.samples, args.eval_samples)
    eval_dir = work / "synth" / "eval"
    converted = work / "converted" / CONVERTED           # CLIP_benchmark's way of writing a set → contrast eval
    judged(args.side_python, f"judge_convert({str(eval_dir / 'zeroshot_heldout')!r}, {str(converted)!r}, "
           f"{max(1, args.eval_samples // 3)})")
    ours = contrast_eval(checkpoint, eval_dir, [*ZEROSHOT_SETS, *RETRIEVAL_SETS], work)
    ours.update(contrast_eval(checkpoint, converted.parent, [CONVERTED], work))
    oc = work / "oc"
    contrast("-q", "export", checkpoint, "--format", "open_clip", "--out", str(oc))
    tokenizer = judged(args.side_python, f"judge_tokenizer({str(oc)!r})").strip()
    theirs = {name: clip_benchmark(args.side_python, oc, eval_dir / name, "zeroshot_classification", work)
              for name in ZEROSHOT_SETS}
    theirs[CONVERTED] = clip_benchmark(args.side_python, oc, converted, "zeroshot_classification", work)
    theirs.update({name: clip_benchmark(args.side_python, oc, eval_dir / name, "zeroshot_retrieval", work)
                   for name in RETRIEVAL_SETS})
    rows = compare(ours, theirs)
    print(f"checkpoint {checkpoint}; open_clip tokenizer: {tokenizer} (HFTokenizer: the folder's tokenizer.json)")
    width = max(len(name) for name, _, _ in rows)
    print(f"{'metric':<{width}} {'contrast eval':>13} {'CLIP_benchmark':>14} {'|diff|':>8}")
    for name, a, b in rows:
        print(f"{name:<{width}} {a:>13.4f} {b:>14.4f} {abs(a - b):>8.4f}")
    relation = theirs["relation"]
    print(f"relation: contrast eval accuracy {ours['relation/accuracy']:.4f}; CLIP_benchmark reads it as retrieval: "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(relation.items())))
    samples = {}
    print("sample by sample (logits at scale 100; margin: our top-2 gap of a differing prediction):")
    for name in ZEROSHOT_SETS:
        mine = our_logits(checkpoint, eval_dir, name)
        for mode in ("fp32", "amp"):
            out = work / f"cb_logits_{name}_{mode}.npy"
            judged(args.side_python, f"judge_logits({str(oc)!r}, {str(eval_dir / name)!r}, {str(out)!r}, "
                   f"{mode == 'amp'})")
            r = samples[f"{name}/{mode}"] = sample_agreement(mine, (np.load(out), np.load(str(out) + ".labels.npy")))
            shown = ", ".join(f"{m:.4f}" for m in r["margins_of_differing"][:8])
            print(f"  {name} {mode:>4}: acc@1 {r['acc1_ours']:.4f} / {r['acc1_theirs']:.4f}; largest logit difference "
                  f"{r['max_logit_diff']:.2e}; {r['differ']} of {r['samples']} predictions differ"
                  + (f" (margins {shown}{' …' if r['differ'] > 8 else ''}, largest "
                     f"{r['margins_of_differing'][-1]:.4f})" if r["differ"] else "")
                  + f"; smallest margin of the set {r['smallest_margin']:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": checkpoint, "tokenizer": tokenizer, "contrast": ours,
                                         "clip_benchmark": theirs, "samples": samples}, indent=2))
    worst = max(abs(a - b) for name, a, b in rows if name.endswith("/acc1"))
    fp32_differ = sum(r["differ"] for key, r in samples.items() if key.endswith("/fp32"))
    print(f"largest zero-shot acc@1 difference (CLIP_benchmark's CLI, --no_amp) {worst:.4f} (tolerance "
          f"{args.tolerance}); fp32 predictions that differ: {fp32_differ}")
    return 0 if worst <= args.tolerance and fp32_differ == 0 and tokenizer == "HFTokenizer" else 1


if __name__ == "__main__":
    sys.exit(main())
