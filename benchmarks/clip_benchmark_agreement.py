"""LAION's CLIP_benchmark reads our eval sets as they are and agrees with `contrast eval`.

A published checkpoint (a short `contrast run configs/demo.yaml`, or --checkpoint) is evaluated twice
on the eval sets that `contrast data synth` writes (CLIP_benchmark's local WebDataset layout):

- by `contrast eval` (our reader, our preprocessing, our tokenizer);
- by CLIP_benchmark (`clip_benchmark eval --model local-dir:OC --pretrained none --dataset wds/SET
  --dataset_root SETDIR`, fp32) on the `contrast export --format open_clip` folder, in the side venv of
  /work/shared/tools/make-open-clip-venv.sh (open_clip + CLIP_benchmark; `tv_shim_hook` imported first).

The other way round, `zeroshot_heldout` is re-written by CLIP_benchmark's own converter
(`webdataset_builder.convert_dataset`: lossless WebP, its keys, several shards) and both evaluate that copy.

Printed: each metric both ways and the difference; the exit code is 1 when a zero-shot acc@1 differs by
more than --tolerance (0.02). Zero-shot sets are compared on acc@1, acc@5 and mean per-class recall,
the retrieval set on recall@1/5/10 both ways (CLIP_benchmark's "image retrieval" is our text→image);
the relation set is read by CLIP_benchmark as a retrieval set (it ignores our KEY.json with the
swapped caption), so its recalls are printed without a counterpart. If the exported
open_clip_config.json does not declare the folder's own tokenizer (open_clip would take its CLIP BPE,
ids up to 49407), the script declares it (text_cfg.hf_tokenizer_name and tokenizer_config.json) and
says so. It skips (exit 0) when the side python cannot import CLIP_benchmark.

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

REPO = Path(__file__).resolve().parents[1]
SIDE_PYTHON = Path.home() / ".cache" / "open-clip-venv" / "bin" / "python"
ZEROSHOT_SETS = ("zeroshot_heldout", "zeroshot_seen")
RETRIEVAL_SETS = ("retrieval", "relation")
KS = (1, 5, 10)
CONVERTED = "heldout_cb_written"    # zeroshot_heldout re-written by CLIP_benchmark's converter


# ------------------------------------------------------------------ the judge (runs in the side venv)
def _shim() -> None:
    """Make the CUDA torchvision wheel importable beside a CPU torch: before open_clip or torchvision."""
    import tv_shim_hook  # noqa: F401


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


def export_open_clip(checkpoint: str, out: Path) -> bool:
    """`contrast export --format open_clip`; declares the folder's tokenizer when the export does not.
    Returns whether the config had to be patched."""
    contrast("-q", "export", checkpoint, "--format", "open_clip", "--out", str(out))
    config_path = out / "open_clip_config.json"
    config = json.loads(config_path.read_text())
    text_cfg = config["model_cfg"]["text_cfg"]
    if "hf_tokenizer_name" in text_cfg:
        return False
    from tokenizers import Tokenizer

    tok_json = json.loads((out / "tokenizer.json").read_text())
    names = Tokenizer.from_str(json.dumps(tok_json))
    vocab = names.get_vocab_size()
    text_cfg["hf_tokenizer_name"] = "."                  # with local-dir:, open_clip reads the folder's tokenizer
    config_path.write_text(json.dumps(config, indent=2))
    if not (out / "tokenizer_config.json").exists():
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": text_cfg["context_length"],
            "pad_token": names.id_to_token(0), "eos_token": names.id_to_token(vocab - 1)}, indent=2))
    return True


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
    ap.add_argument("--tolerance", type=float, default=0.02, help="largest zero-shot acc@1 difference allowed")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    probe = side(args.side_python, "-c", "import tv_shim_hook, clip_benchmark") if args.side_python.exists() else None
    if probe is None or probe.returncode:
        print(f"skipped: CLIP_benchmark is not importable by {args.side_python} (build the side venv with "
              "/work/shared/tools/make-open-clip-venv.sh, or pass --side-python)")
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
    patched = export_open_clip(checkpoint, work / "oc")
    tokenizer = judged(args.side_python, f"judge_tokenizer({str(work / 'oc')!r})").strip()
    oc = work / "oc"
    theirs = {name: clip_benchmark(args.side_python, oc, eval_dir / name, "zeroshot_classification", work)
              for name in ZEROSHOT_SETS}
    theirs[CONVERTED] = clip_benchmark(args.side_python, oc, converted, "zeroshot_classification", work)
    theirs.update({name: clip_benchmark(args.side_python, oc, eval_dir / name, "zeroshot_retrieval", work)
                   for name in RETRIEVAL_SETS})
    rows = compare(ours, theirs)
    print(f"checkpoint {checkpoint}; open_clip tokenizer: {tokenizer}"
          + ("; open_clip_config.json patched to declare the folder's tokenizer" if patched else ""))
    width = max(len(name) for name, _, _ in rows)
    print(f"{'metric':<{width}} {'contrast eval':>13} {'CLIP_benchmark':>14} {'|diff|':>8}")
    for name, a, b in rows:
        print(f"{name:<{width}} {a:>13.4f} {b:>14.4f} {abs(a - b):>8.4f}")
    relation = theirs["relation"]
    print(f"relation: contrast eval accuracy {ours['relation/accuracy']:.4f}; CLIP_benchmark reads it as retrieval: "
          + ", ".join(f"{k} {v:.4f}" for k, v in sorted(relation.items())))
    if args.json:
        args.json.write_text(json.dumps({"checkpoint": checkpoint, "tokenizer": tokenizer, "patched": patched,
                                         "contrast": ours, "clip_benchmark": theirs}, indent=2))
    worst = max(abs(a - b) for name, a, b in rows if name.endswith("/acc1"))
    print(f"largest zero-shot acc@1 difference {worst:.4f} (tolerance {args.tolerance})")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
