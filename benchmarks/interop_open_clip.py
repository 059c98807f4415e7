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

Prints the largest differences (unit-length embeddings) and exits 1 if one is over 1e-5 (images of the
model's own size; other sizes are reported: the resize differs slightly, torchvision vs our one PIL call).
Skips cleanly (exit 0) when open_clip cannot be imported with the given interpreter.
"""
from __future__ import annotations

import argparse
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
    out["ids"] = open_clip.get_tokenizer("ViT-B-32")(job["strings"])
    out["ids16"] = open_clip.get_tokenizer("ViT-B-32")(job["strings"], context_length=16)
    torch.save(out, work / "open_clip.pt")


# ------------------------------------------------------------------------------------ our side
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
               "import_images": import_images, "import_models": args.models}
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
    width = max(len(r[0]) for r in rows)
    for what, value, strict in rows:
        print(f"{what:<{width}}  max |Δ| {value:.2e}" + ("" if strict else "  (reported)"))
    print(f"CLIP BPE ids vs open_clip's SimpleTokenizer on {len(STRINGS)} strings at 77 and 16 tokens: "
          + ("identical" if same_ids else "DIFFERENT"))
    bad = [r for r in rows if r[2] and r[1] > TOLERANCE]
    return 1 if bad or not same_ids else 0


if __name__ == "__main__":
    sys.exit(main())
