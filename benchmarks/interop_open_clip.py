"""Interoperability with the real open_clip, as its users run it (a side venv: open_clip imports torchvision).

Run in the project venv; the open_clip side runs this same file in the side venv (`--side`), and the two
exchange raw inputs, folders and embeddings through a work folder:

    V=$(bash ../shared/tools/make-open-clip-venv.sh)      # open_clip, open_clip_train, CLIP_benchmark
    python benchmarks/interop_open_clip.py --open-clip-python $V/bin/python

1. export: a demo-sized model of ours ("tiny", 64 px, a BPE trained on synthetic captions; every weight
   random) → `contrast export --format open_clip` → `open_clip.create_model_and_transforms("local-dir:…")`
   and `get_tokenizer("local-dir:…")` embed raw strings and PIL images; ours embed the same raw inputs.
2. import: `open_clip.create_model("ViT-B-32"[-quickgelu])` random, saved as a hub folder and as an
   `epoch_1.pt` training checkpoint → `model.init_from`; open_clip and we embed the same raw inputs, and
   open_clip's SimpleTokenizer and ours tokenize a varied list of strings.

3. with `--checkpoint run_dir/published/step_N --eval-set DIR` (a zero-shot set of ours, e.g. the demo's
   data/synth/eval/zeroshot_heldout): CLIP_benchmark's zero-shot classification of the open_clip export,
   on the set rewritten in CLIP_benchmark's `wds/` layout, against `contrast eval` (acc@1 within 0.02).

Prints the largest differences (unit-length embeddings) and exits 1 if one is over 1e-5 (images of the
model's own size; other sizes are reported: the resize differs slightly, torchvision vs our one PIL call).
Skips cleanly (exit 0) when open_clip cannot be imported with the given interpreter.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if "--side" in sys.argv:       # the side venv: the torchvision shim goes in before torch
    import tv_shim_hook  # noqa: F401
import torch

TOLERANCE = 1e-5
STRINGS = ["a photo of a cat", "A PHOTO of a Dog!", "  leading and   trailing\twhitespace \n",
           "it's, we're, they'll, I'd", "numbers 12345 and 3.14159", "café naïve résumé Ålesund",
           "Straße ΣΊΣΥΦΟΣ İstanbul", "日本語のテキスト 中文 한국어", "emoji 🐱‍👤 🎉👍🏽",
           "html &amp; entities &lt;b&gt; &#39;q&#39;", "mojibake: Ã©tÃ© â€” done", "<start_of_text> in <END_OF_TEXT>",
           "x" * 300, " ".join(["word"] * 100), "", "ﬁ ligature ½ ²", "zero\u200bwidth", "control\x1cchars"]
CAPTIONS = ["a red square left of a blue circle", "two green stars above a purple triangle",
            "a small yellow circle", "a large blue square below a red star"]


# ------------------------------------------------------------------------------------ shared
def write_images(folder: Path, sizes: list[tuple[int, int]]) -> list[str]:
    """PNG images of smooth random colour fields (raw inputs for both sides)."""
    import numpy as np
    from PIL import Image
    names = []
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        base = rng.uniform(0, 255, (max(2, h // 8), max(2, w // 8), 3)).astype("uint8")
        img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
        names.append(str(folder / f"img{i}_{w}x{h}.png"))
        img.save(names[-1])
    return names


# ------------------------------------------------------------------------------------ the open_clip side
def open_clip_side(work: Path) -> None:
    """Run in the side venv: every open_clip call of the comparison; writes tensors into `work`."""
    import open_clip
    import tv_shim_hook  # noqa: F401  (makes torchvision importable beside the CPU torch)
    from PIL import Image
    from safetensors.torch import save_file
    job = json.loads((work / "job.json").read_text())
    out = {}
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{work / 'export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{work / 'export'}")
    model.eval()
    with torch.no_grad():
        out["export_text"] = model.encode_text(tokenizer(job["captions"]), normalize=True)
        pixels = torch.stack([preprocess(Image.open(p)) for p in job["export_images"]])
        out["export_image"] = model.encode_image(pixels, normalize=True)
    for name in job["import_models"]:
        torch.manual_seed(0)
        model = open_clip.create_model(name, pretrained=None).eval()
        folder = work / name
        folder.mkdir(exist_ok=True)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / "open_clip_model.safetensors"))
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(name),
                                                                   "preprocess_cfg": {}}))
        torch.save({"epoch": 1, "name": name, "state_dict": {f"module.{k}": v for k, v in weights.items()}},
                   folder / "epoch_1.pt")
        preprocess = open_clip.create_model_and_transforms(name, pretrained=None)[2]
        tokenizer = open_clip.get_tokenizer(name)
        with torch.no_grad():
            out[f"{name}_text"] = model.encode_text(tokenizer(job["captions"]), normalize=True)
            out[f"{name}_image"] = model.encode_image(
                torch.stack([preprocess(Image.open(p)) for p in job["import_images"]]), normalize=True)
    if job.get("clip_benchmark"):
        out["clip_benchmark_acc1"] = torch.tensor(clip_benchmark_acc1(work))
    out["ids"] = open_clip.get_tokenizer("ViT-B-32")(job["strings"])
    out["ids16"] = open_clip.get_tokenizer("ViT-B-32")(job["strings"], context_length=16)
    torch.save(out, work / "open_clip.pt")


def clip_benchmark_acc1(work: Path) -> float:
    """CLIP_benchmark's zero-shot acc@1 of the export in `work/cb_export` on the set in `work/cb_set`."""
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc

    def accuracy(output, target, topk=(1,)):      # CLIP_benchmark's, without float() of a 1-element array
        pred = output.topk(max(topk), 1, True, True)[1].t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [float(correct[:k].reshape(-1).float().sum()) / len(target) for k in topk]
    zsc.accuracy = accuracy
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{work / 'cb_export'}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{work / 'cb_export'}")
    dataset = build_dataset("wds/cb_set", root=str(work / "cb_set"), transform=preprocess, split="test")
    loader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None, num_workers=0)
    metrics = zsc.evaluate(model.eval(), loader, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    return float(metrics["acc1"])


# ------------------------------------------------------------------------------------ our side
def clip_benchmark_set(eval_set: Path, out: Path) -> None:
    """Our zero-shot set rewritten in CLIP_benchmark's `wds/` layout: test/{0..n-1}.tar of KEY.jpg + KEY.cls,
    nshards.txt, classnames.txt, zeroshot_classification_templates.txt."""
    import tarfile
    (out / "test").mkdir(parents=True)
    shards = sorted(eval_set.glob("*.tar"))
    for i, shard in enumerate(shards):
        with tarfile.open(shard) as src, tarfile.open(out / "test" / f"{i}.tar", "w") as dst:
            for member in src.getmembers():
                data = src.extractfile(member).read()
                key, ext = member.name.rsplit(".", 1)
                if ext == "json":
                    name, data = f"{key}.cls", str(json.loads(data)["label"]).encode()
                elif ext in ("jpg", "png", "webp"):
                    name = member.name
                else:
                    continue
                info = tarfile.TarInfo(name)
                info.size = len(data)
                dst.addfile(info, io.BytesIO(data))
    (out / "test" / "nshards.txt").write_text(str(len(shards)))
    for name in ("classnames.txt", "zeroshot_classification_templates.txt"):
        (out / name).write_text((eval_set / name).read_text())


def contrast_eval_acc1(checkpoint: str, eval_set: Path) -> float:
    """`contrast eval`'s zero-shot acc@1 of the checkpoint on the set."""
    from pipeline.config import load_config
    from pipeline.eval.evaluate import evaluate_checkpoint
    cfg = load_config(None, [f"data.eval_dir={eval_set.parent}", f"eval.sets=[{eval_set.name}]"], validate=False)
    metrics = evaluate_checkpoint(checkpoint, cfg)["metrics"]
    return metrics[f"{eval_set.name}/acc1"]



def our_images(paths: list[str], size: int) -> torch.Tensor:
    """Our evaluation transform of image files (what `contrast eval` feeds the model)."""
    from pipeline.data.transforms import decode_image, to_tensor
    return to_tensor([decode_image(Path(p).read_bytes(), size) for p in paths])


def export_ours(work: Path) -> dict[str, torch.Tensor]:
    """A demo-sized published checkpoint (random weights, a trained BPE) exported for open_clip."""
    from pipeline.config import load_config
    from pipeline.data import train_tokenizer
    from pipeline.models import build_model, save_published
    from pipeline.models.export import export
    cfg = load_config("configs/demo.yaml", ["run_dir=" + str(work / "run")])
    tokenizer = train_tokenizer(CAPTIONS * 50, vocab_size=400, context_length=cfg.data.context_length)
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                        vocab_size=tokenizer.vocab_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    url = str(work / "run" / "published" / "step_00000001")
    save_published(model, tokenizer, url, 1, run_config=cfg)
    export(url, "open_clip", str(work / "export"))
    with torch.no_grad():
        return {"export_text": model.encode_text(tokenizer(CAPTIONS)), "image_size": torch.tensor(cfg.data.image_size)}


def import_ours(work: Path, name: str, images: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Our embeddings of the raw inputs with the open_clip model imported as a folder and as epoch_1.pt."""
    from pipeline.config import load_config
    from pipeline.models import build_run_model, run_tokenizer
    out = {}
    for how, overrides in (("folder", [f"model.init_from={work / name}"]),
                           ("epoch_1.pt", [f"model.init_from={work / name / 'epoch_1.pt'}",
                                           f"model.init_from_config={name}"])):
        cfg = load_config(None, [*overrides, "data.image_size=224", "data.context_length=77"])
        model, tokenizer = build_run_model(cfg, 0).eval(), run_tokenizer(cfg)
        with torch.no_grad():
            out[how] = {"text": model.encode_text(tokenizer(CAPTIONS)),
                        "image": model.encode_image(our_images(images, 224))}
    return out


def diff(a: torch.Tensor, b: torch.Tensor, rows: slice = slice(None)) -> float:
    """Largest difference of two (N, D) embeddings, checked to be far below the spread between their rows
    (so that agreement is not that of a degenerate model mapping everything to one point)."""
    spread = float((a[1:] - a[:1]).abs().max())
    assert spread > 100 * TOLERANCE, f"embeddings of different inputs differ by only {spread:.1e}"
    return float((a[rows].float() - b[rows].float()).abs().max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--open-clip-python", default=os.environ.get("OPEN_CLIP_PYTHON",
                                                                 str(Path.home() / ".cache/open-clip-venv/bin/python")))
    p.add_argument("--models", nargs="+", default=["ViT-B-32", "ViT-B-32-quickgelu"])
    p.add_argument("--checkpoint", help="a published checkpoint to run CLIP_benchmark on (with --eval-set)")
    p.add_argument("--eval-set", type=Path, help="one of our zero-shot sets (shards, classnames, templates)")
    p.add_argument("--side", metavar="WORK", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side:
        open_clip_side(Path(args.side))
        return 0
    probe = subprocess.run([args.open_clip_python, "-c", "import tv_shim_hook, open_clip"], capture_output=True)
    if probe.returncode:
        print(f"skipped: open_clip is not importable with {args.open_clip_python} "
              "(build the side venv with ../shared/tools/make-open-clip-venv.sh)")
        return 0
    from pipeline.data import clip_tokenizer
    with tempfile.TemporaryDirectory(prefix="interop-") as tmp:
        work = Path(tmp)
        ours = export_ours(work)
        size = int(ours["image_size"])
        export_images = write_images(work, [(size, size), (size, size), (size + 16, size), (size, size + 40)])
        import_images = write_images(work, [(224, 224), (224, 224), (300, 224)])
        job = {"captions": CAPTIONS, "strings": STRINGS, "export_images": export_images,
               "import_images": import_images, "import_models": args.models, "clip_benchmark": bool(args.checkpoint)}
        if args.checkpoint:
            from pipeline.models.export import export
            export(args.checkpoint, "open_clip", str(work / "cb_export"))
            clip_benchmark_set(args.eval_set, work / "cb_set")
            ours_acc1 = contrast_eval_acc1(args.checkpoint, args.eval_set)
        (work / "job.json").write_text(json.dumps(job))
        env = {**os.environ, "PYTHONPATH": ""}
        subprocess.run([args.open_clip_python, os.path.abspath(__file__), "--side", tmp], check=True, env=env)
        theirs = torch.load(work / "open_clip.pt", weights_only=True)

        from pipeline.models import load_published
        published = load_published(str(work / "run" / "published" / "step_00000001"))
        with torch.no_grad():
            ours_image = published.encode_image(our_images(export_images, size))
        rows = [("export tiny → open_clip: text (raw strings, its tokenizer)",
                 diff(ours["export_text"], theirs["export_text"]), True),
                (f"export tiny → open_clip: images {size}x{size}",
                 diff(ours_image, theirs["export_image"], slice(0, 2)), True),
                ("export tiny → open_clip: images of other sizes (resize differs)",
                 diff(ours_image, theirs["export_image"], slice(2, None)), False)]
        for name in args.models:
            for how, emb in import_ours(work, name, import_images).items():
                rows += [(f"import {name} ({how}): text", diff(emb["text"], theirs[f"{name}_text"]), True),
                         (f"import {name} ({how}): images 224x224",
                          diff(emb["image"], theirs[f"{name}_image"], slice(0, 2)), True),
                         (f"import {name} ({how}): image 300x224 (resize differs)",
                          diff(emb["image"], theirs[f"{name}_image"], slice(2, None)), False)]
        same_ids = (torch.equal(clip_tokenizer(77)(STRINGS), theirs["ids"])
                    and torch.equal(clip_tokenizer(16)(STRINGS), theirs["ids16"]))
    if args.checkpoint:
        theirs_acc1 = float(theirs["clip_benchmark_acc1"])
        print(f"zero-shot acc@1 on {args.eval_set.name}: CLIP_benchmark {theirs_acc1:.4f}, contrast eval "
              f"{ours_acc1:.4f} (|Δ| {abs(theirs_acc1 - ours_acc1):.4f}, allowed 0.02)")
        if abs(theirs_acc1 - ours_acc1) > 0.02:
            return 1
    width = max(len(r[0]) for r in rows)
    for what, value, strict in rows:
        print(f"{what:<{width}}  max |Δ| {value:.2e}" + ("" if strict else "  (reported)"))
    print(f"CLIP BPE ids vs open_clip's SimpleTokenizer on {len(STRINGS)} strings at 77 and 16 tokens: "
          + ("identical" if same_ids else "DIFFERENT"))
    bad = [r for r in rows if r[2] and r[1] > TOLERANCE]
    return 1 if bad or not same_ids else 0


if __name__ == "__main__":
    sys.exit(main())
