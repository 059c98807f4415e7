"""CoCa interoperability with the real open_clip (a side venv; see interop_open_clip.py for the CLIP checks).

    V=$(bash ../shared/tools/make-open-clip-venv.sh)
    python benchmarks/interop_open_clip_coca.py --open-clip-python $V/bin/python

1. export: a coca_tiny of ours (32 px, a BPE trained on a few captions plus CoCa's `<start>`, random weights)
   → `contrast export --format open_clip` → `open_clip.create_model_and_transforms("local-dir:…")`: its
   embeddings of the same pixels and of the raw captions (its tokenizer), and its greedy `generate`
   (`generation_type="top_k"`, `top_k=1`), token for token against `Published.generate_ids`.
2. import: `open_clip.create_model("coca_ViT-B-32")` random, saved as a hub folder → `model.init_from`
   (model.name coca_ViT-B-32): embeddings and greedy captions of the same pixels and captions.

Prints the largest embedding differences (exit 1 over 1e-5) and whether the captions and the token ids are
identical. open_clip 3.3's `generate` needs transformers < 4.56 (it imports `BeamSearchScorer`, gone from 4.57
and 5; the side venv has 5): when the side venv's own transformers lacks it, the script installs
`transformers>=4.55,<4.56` (with `huggingface-hub<1`, `tokenizers<0.22`) once into `<side venv>/transformers-4.55`
with the side's pip (`--no-deps --target`) and runs open_clip with it on PYTHONPATH. The export's token ids are
also checked with the side venv's own transformers (both versions load our `tokenizer.json` as a fast tokenizer;
4.x rewrites the pre-tokenizer's `add_prefix_space` from `tokenizer_config.json`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if {"--side", "--side-tokens"} & set(sys.argv):      # the side venv: the torchvision shim goes in before torch
    import tv_shim_hook  # noqa: F401
import torch

TOLERANCE, MAX_LEN = 1e-5, 12
GENERATE_PINS = ("transformers>=4.55,<4.56", "huggingface-hub<1", "tokenizers<0.22")
CAPTIONS = ["a red square left of a blue circle", "two green stars above a purple triangle",
            "a small yellow circle", "a large blue square below a red star"]


def export_perturbed_coca(cfg, tok, work: Path, noise: float = 0.05):
    """A coca_tiny of `cfg`'s sizes, random weights plus `noise` (a fresh decoder projection ties every logit),
    published under `work`/run and exported to `work`/export in open_clip's layout: (model, published url)."""
    from pipeline.models import build_model, save_published
    from pipeline.models.export import export
    torch.manual_seed(0)
    model = build_model(cfg.model, image_size=cfg.data.image_size, context_length=cfg.data.context_length,
                        vocab_size=tok.vocab_size).eval()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(noise * torch.randn_like(prm))
    url = save_published(model, tok, str(work / "run" / "published" / "step_00000001"), 1, run_config=cfg)
    export(url, "open_clip", str(work / "export"))
    return model, url


def side_tokens(work: Path) -> None:
    """In the side venv with its own transformers: the export's ids of the raw captions (`work`/tokens_own.pt)."""
    import open_clip
    import transformers
    print(f"side venv's own transformers {transformers.__version__}: tokenizer only")
    torch.save(open_clip.get_tokenizer(f"local-dir:{work / 'export'}")(CAPTIONS), work / "tokens_own.pt")


def generate_path(python: str) -> str:
    """PYTHONPATH for the side venv's open_clip `generate`: '' when its own transformers serves, else a
    transformers < 4.56 installed (once) beside the venv with the side's own pip."""
    probe = "import tv_shim_hook, open_clip.coca_model as m; raise SystemExit(0 if m._has_transformers else 1)"
    if subprocess.run([python, "-c", probe], capture_output=True).returncode == 0:
        return ""
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            check=True).stdout.strip()
    target = Path(prefix) / "transformers-4.55"
    if not (target / "transformers").is_dir():
        print(f"open_clip's generate needs transformers < 4.56: installing {' '.join(GENERATE_PINS)} into {target}")
        subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), *GENERATE_PINS],
                       check=True)
    return str(target)


def open_clip_side(work: Path) -> None:
    """In the side venv: every open_clip call; writes tensors into `work`."""
    import open_clip
    import transformers
    from safetensors.torch import save_file
    print(f"side venv: open_clip {open_clip.__version__}, transformers {transformers.__version__}")
    job = torch.load(work / "job.pt", weights_only=True)
    out = {}
    model = open_clip.create_model_and_transforms(f"local-dir:{work / 'export'}")[0].eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{work / 'export'}")
    ids = job["export_ids"].tolist()
    with torch.no_grad():
        out["export_image"] = model.encode_image(job["export_pixels"], normalize=True)
        out["export_text"] = model.encode_text(tokenizer(CAPTIONS), normalize=True)
        out["export_tokens"] = tokenizer(CAPTIONS)
        out["export_captions"] = model.generate(job["export_pixels"], generation_type="top_k", top_k=1,
                                                seq_len=MAX_LEN, min_seq_len=1, sot_token_id=ids[0],
                                                eos_token_id=ids[1], pad_token_id=ids[2])
    torch.manual_seed(0)
    model = open_clip.create_model("coca_ViT-B-32", pretrained=None).eval()
    with torch.no_grad():                      # its decoder projection starts at zero: every logit equal, no argmax
        for prm in model.parameters():
            prm.add_(0.02 * torch.randn_like(prm))
    folder = work / "coca_ViT-B-32"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("coca_ViT-B-32"),
                                                               "preprocess_cfg": {}}))
    tokenizer = open_clip.get_tokenizer("coca_ViT-B-32")
    with torch.no_grad():
        out["import_image"] = model.encode_image(job["import_pixels"], normalize=True)
        out["import_text"] = model.encode_text(tokenizer(CAPTIONS), normalize=True)
        out["import_captions"] = model.generate(job["import_pixels"], generation_type="top_k", top_k=1,
                                                seq_len=MAX_LEN, min_seq_len=1)
    out["params_B32"] = torch.tensor(sum(p.numel() for p in model.parameters()))
    torch.save(out, work / "open_clip.pt")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--open-clip-python", default=os.environ.get("OPEN_CLIP_PYTHON",
                                                                 str(Path.home() / ".cache/open-clip-venv/bin/python")))
    p.add_argument("--side", metavar="WORK", help=argparse.SUPPRESS)
    p.add_argument("--side-tokens", metavar="WORK", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side or args.side_tokens:
        (open_clip_side if args.side else side_tokens)(Path(args.side or args.side_tokens))
        return 0
    if subprocess.run([args.open_clip_python, "-c", "import tv_shim_hook, open_clip"], capture_output=True).returncode:
        print(f"skipped: open_clip is not importable with {args.open_clip_python}")
        return 0
    from pipeline.config import load_config
    from pipeline.data import train_tokenizer, with_start_token
    from pipeline.models import build_run_model, load_published, run_tokenizer
    extra_path = generate_path(args.open_clip_python)
    with tempfile.TemporaryDirectory(prefix="interop-coca-") as tmp:
        work = Path(tmp)
        cfg = load_config(None, ["model.name=coca_tiny", "data.image_size=32", "data.context_length=16",
                                 f"run_dir={work / 'run'}"])
        tok = with_start_token(train_tokenizer(CAPTIONS * 50, vocab_size=400, context_length=16))
        published = load_published(export_perturbed_coca(cfg, tok, work)[1])
        g = torch.Generator().manual_seed(1)
        job = {"export_pixels": torch.randn(4, 3, 32, 32, generator=g),
               "import_pixels": torch.randn(2, 3, 224, 224, generator=g),
               "export_ids": torch.tensor([tok.sot_id, tok.eot_id, tok.pad_id])}
        torch.save(job, work / "job.pt")
        side = [args.open_clip_python, os.path.abspath(__file__)]
        subprocess.run([*side, "--side", tmp], check=True, env={**os.environ, "PYTHONPATH": extra_path})
        theirs = torch.load(work / "open_clip.pt", weights_only=True)
        if extra_path:
            subprocess.run([*side, "--side-tokens", tmp], check=True, env={**os.environ, "PYTHONPATH": ""})
        own_tokens = torch.load(work / "tokens_own.pt", weights_only=True) if extra_path else theirs["export_tokens"]
        with torch.no_grad():
            ours = {"export_image": published.encode_image(job["export_pixels"]),
                    "export_text": published.encode_text(tok(CAPTIONS)),
                    "export_captions": published.generate_ids(job["export_pixels"], MAX_LEN)}
            icfg = load_config(None, ["model.name=coca_ViT-B-32", f"model.init_from={work / 'coca_ViT-B-32'}",
                                      "data.image_size=224", "data.context_length=76"])
            imported, itok = build_run_model(icfg, 0).eval(), run_tokenizer(icfg)
            ours.update(import_image=imported.encode_image(job["import_pixels"]),
                        import_text=imported.encode_text(itok(CAPTIONS)),
                        import_captions=imported.generate(job["import_pixels"], sot_id=itok.sot_id,
                                                          eot_id=itok.eot_id, pad_id=itok.pad_id, max_len=MAX_LEN))
        same_tokens = torch.equal(tok(CAPTIONS), theirs["export_tokens"]) and torch.equal(tok(CAPTIONS), own_tokens)
        if not same_tokens:
            print("ours  ", tok(CAPTIONS)[0].tolist(), "\ntheirs", theirs["export_tokens"][0].tolist(),
                  "\ntheirs, side venv's own transformers", own_tokens[0].tolist())
    bad = False
    for key in ("export_image", "export_text", "import_image", "import_text"):
        d = float((ours[key] - theirs[key]).abs().max())
        bad |= d > TOLERANCE
        print(f"{key:<14} max |Δ| {d:.2e}")
    for key in ("export_captions", "import_captions"):
        same = ours[key].shape == theirs[key].shape and torch.equal(ours[key], theirs[key])
        bad |= not same
        print(f"{key:<14} greedy tokens {'identical' if same else 'DIFFERENT'}: ours {ours[key].tolist()}"
              + ("" if same else f" theirs {theirs[key].tolist()}"))
    print("caption token ids, our tokenizer vs open_clip's local-dir tokenizer (both transformers): "
          + ("identical" if same_tokens else "DIFFERENT"))
    print(f"open_clip coca_ViT-B-32 parameters: {int(theirs['params_B32']):,}")
    return 1 if bad or not same_tokens else 0


if __name__ == "__main__":
    sys.exit(main())
