"""CLIP_benchmark's own captioning evaluation against our `captioning` task, on one CLIP_benchmark-layout set.

    V=$(bash ../shared/tools/make-open-clip-venv.sh)
    python benchmarks/interop_clip_benchmark_captioning.py --checkpoint RUN/published/step_N [--samples 200]

The set is `captioning_heldout` (`contrast data synth`'s held-out colour–shape combinations, 5 reference captions
a line: CLIP_benchmark's captioning layout, its wds form of mscoco_captions), written for the checkpoint's image
size into the work folder. Then:

- ours: `contrast eval`'s `captioning` task on the published checkpoint (greedy, `--max-len` tokens): BLEU-4 and
  CIDEr-D from pycocoevalcap's scorers on `caption_words` tokens;
- CLIP_benchmark: `clip_benchmark eval --task captioning --model local-dir:OC --pretrained none --dataset
  wds/captioning_heldout` (its CLI, in the side venv) on the `contrast export --format open_clip` folder, twice:
  with open_clip's `generate` as CLIP_benchmark calls it (beam search: 6 beams in 3 groups, 30 tokens or the
  context length when shorter, at least 5), and greedy (`generation_type="top_k"`, `top_k=1`, `--max-len`
  tokens, at least 1) as ours. Its scores come from pycocoevalcap's own PTB tokenizer (Java) and scorers.

Three things CLIP_benchmark cannot do here are changed in the side process, and only those: it calls
`generate` with CLIP's start and end ids (49406, 49407) and decodes with CLIP's BPE, so `generate` gets the
export's start, end and pad ids and the decoding is the export's tokenizer (cut at the end token); SPICE needs
Stanford CoreNLP models downloaded at first use (no internet here), so it is left out (NaN); open_clip's
`generate` needs transformers < 4.56 (installed beside the side venv, see interop_open_clip_coca.py).

Printed: BLEU-4 and CIDEr both ways, how many greedy captions are identical word for word, and our scorers on
CLIP_benchmark's greedy captions (what is left of a difference once generation is the same). Exit 1 when a
greedy caption differs or a greedy BLEU-4 / CIDEr differs by more than --tolerance.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SIDE_PYTHON = Path.home() / ".cache" / "open-clip-venv" / "bin" / "python"
SET = "captioning_heldout"
GREEDY = {"generation_type": "top_k", "top_k": 1, "min_seq_len": 1}      # seq_len: --max-len
DEFAULT_SEQ_LEN = 30                       # open_clip's `generate` default, which CLIP_benchmark keeps


# ------------------------------------------------------------------ the judge (runs in the side venv)
def judge(job: dict) -> None:
    """CLIP_benchmark's CLI on the job's export and set; writes its generated captions to job["captions"]."""
    __import__("tv_shim_hook")        # before torch and open_clip: the side venv's CUDA-only torchvision
    import open_clip
    import torch
    from clip_benchmark import cli
    from clip_benchmark.metrics import captioning as cb_captioning

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    hf = open_clip.get_tokenizer(f"local-dir:{job['export']}").tokenizer
    sot, eot, pad = job["ids"]
    generated: list[str] = []

    class ExportDecoder:
        """CLIP_benchmark's `_tokenizer.decode`, with the export's tokenizer: ids up to the end token."""

        def decode(self, ids) -> str:
            ids = [int(i) for i in ids]
            ids = ids[: ids.index(eot)] if eot in ids else ids
            text = hf.decode([i for i in ids if i not in (sot, pad)]).strip()
            generated.append(text)
            return text

    class NoSpice:
        """SPICE needs Stanford CoreNLP's models from the internet at first use: left out (NaN)."""

        def method(self) -> str:
            return "SPICE"

        def compute_score(self, gts, res):
            return math.nan, [math.nan] * len(res)

    original = open_clip.CoCa.generate

    def generate(self, image, **kwargs):
        return original(self, image, **{"sot_token_id": sot, "eos_token_id": eot, "pad_token_id": pad,
                                        **job["generate"], **kwargs})

    open_clip.CoCa.generate = generate
    cb_captioning._tokenizer, cb_captioning.Spice = ExportDecoder(), NoSpice
    sys.argv = ["clip_benchmark", "eval", "--model", f"local-dir:{job['export']}", "--pretrained", "none",
                "--dataset", f"wds/{SET}", "--dataset_root", job["set"], "--task", "captioning",
                "--batch_size", "50", "--num_workers", "0", "--output", job["output"]]
    cli.main()
    Path(job["captions"]).write_text(json.dumps(generated))


# ------------------------------------------------------------------ ours, and the comparison
def run_judge(side_python: str, job: dict, work: Path, extra_path: str) -> dict:
    path = work / f"job_{job['name']}.json"
    path.write_text(json.dumps(job))
    subprocess.run([side_python, os.path.abspath(__file__), "--judge", str(path)], check=True,
                   env={**os.environ, "PYTHONPATH": extra_path})
    metrics = json.loads(Path(job["output"]).read_text())["metrics"]
    return {"metrics": metrics, "captions": json.loads(Path(job["captions"]).read_text())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="a published CoCa checkpoint RUN/published/step_N (e.g. make coca-demo's)")
    p.add_argument("--samples", type=int, default=200, help="images in the set (default 200)")
    p.add_argument("--max-len", type=int, default=16, help="greedy caption length in tokens (default 16)")
    p.add_argument("--side-python", default=str(SIDE_PYTHON))
    p.add_argument("--tolerance", type=float, default=1e-6)
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--judge", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.judge:
        judge(json.loads(Path(args.judge).read_text()))
        return 0
    if subprocess.run([args.side_python, "-c", "import tv_shim_hook, open_clip, clip_benchmark"],
                      capture_output=True).returncode:
        print(f"skipped: open_clip and CLIP_benchmark are not importable with {args.side_python}")
        return 0
    if not args.checkpoint:
        p.error("--checkpoint is required (a published CoCa checkpoint)")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from interop_open_clip_coca import generate_path

    from pipeline.config import config_from_dict
    from pipeline.data.synth import write_eval_set
    from pipeline.eval.metrics import caption_metrics, caption_words
    from pipeline.eval.sets import open_eval_set
    from pipeline.eval.tasks import Encoder, captioning
    from pipeline.models import load_published
    from pipeline.models.export import export

    published = load_published(args.checkpoint)
    if not published.can_caption:
        p.error(f"{args.checkpoint} is not a captioning (CoCa) checkpoint")
    cfg = config_from_dict(published.manifest["config"], origin="checkpoint manifest")
    extra_path = generate_path(args.side_python)
    tok = published.tokenizer
    with tempfile.TemporaryDirectory(prefix="cb-captioning-") as tmp:
        work = Path(tmp)
        write_eval_set(str(work / "sets" / SET), SET, args.samples, tok, seed=cfg.data.synth.seed,
                       image_size=published.image_size)
        eval_set = open_eval_set(str(work / "sets"), SET)
        samples = list(eval_set.samples())
        references = [s.caption_lines() for s in samples]
        encoder = Encoder(published, 50)
        ours = captioning(encoder, eval_set, args.max_len, "greedy")
        our_captions = [c for i in range(0, len(samples), 50)
                        for c in published.generate(encoder.pixels([s.image for s in samples[i:i + 50]]),
                                                    args.max_len)]
        export(args.checkpoint, "open_clip", str(work / "oc"))
        context = published.model.context_length         # its 30 tokens do not fit a shorter context
        default = {} if context >= DEFAULT_SEQ_LEN else {"seq_len": context}
        base = {"export": str(work / "oc"), "set": str(work / "sets" / SET),
                "ids": [tok.sot_id, tok.eot_id, tok.pad_id]}
        theirs = {name: run_judge(args.side_python, {**base, "name": name, "generate": gen,
                                                     "output": str(work / f"{name}.json"),
                                                     "captions": str(work / f"{name}_captions.json")},
                                  work, extra_path)
                  for name, gen in (("greedy", {**GREEDY, "seq_len": args.max_len}), ("default", default))}
    greedy = theirs["greedy"]["captions"]
    same = sum(caption_words(a) == caption_words(b) for a, b in zip(our_captions, greedy))
    rescored = caption_metrics(greedy, references)
    rows = {"ours (greedy)": (ours["caption_bleu4"], ours["caption_cider"]),
            "CLIP_benchmark, greedy": (theirs["greedy"]["metrics"]["Bleu_4"], theirs["greedy"]["metrics"]["CIDEr"]),
            "CLIP_benchmark, its beam search": (theirs["default"]["metrics"]["Bleu_4"],
                                                theirs["default"]["metrics"]["CIDEr"]),
            "our scorers on CLIP_benchmark's greedy captions": (rescored["bleu4"], rescored["cider"])}
    print(f"\n{len(samples)} images of {SET}, {len(references[0])} references each; checkpoint {args.checkpoint}")
    print(f"{'':<50} {'BLEU-4':>8} {'CIDEr':>8}")
    for name, (bleu, cider) in rows.items():
        print(f"{name:<50} {bleu:8.4f} {cider:8.4f}")
    for name in ("greedy", "default"):
        m = theirs[name]["metrics"]
        print(f"CLIP_benchmark {name}: METEOR {m['METEOR']:.4f}, ROUGE_L {m['ROUGE_L']:.4f} (SPICE left out)")
    print(f"greedy captions identical word for word: {same} / {len(samples)}; exact match ours "
          f"{ours['caption_exact_match']:.3f}")
    for ours_c, beam_c, refs in list(zip(our_captions, theirs["default"]["captions"], references))[:4]:
        print(f"  ours {ours_c!r} | beam {beam_c!r} | refs {refs[:2]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "identical": same, "samples": len(samples),
                                               "ours": ours, "theirs": {k: v["metrics"] for k, v in theirs.items()},
                                               "examples": list(zip(our_captions, greedy,
                                                                    theirs["default"]["captions"]))[:20]},
                                              indent=2, default=str))
    bleu_gap = abs(rows["ours (greedy)"][0] - rows["CLIP_benchmark, greedy"][0])
    cider_gap = abs(rows["ours (greedy)"][1] - rows["CLIP_benchmark, greedy"][1])
    print(f"greedy: |ΔBLEU-4| {bleu_gap:.2e}, |ΔCIDEr| {cider_gap:.2e} (tolerance {args.tolerance})")
    return 1 if same < len(samples) or max(bleu_gap, cider_gap) > args.tolerance else 0


if __name__ == "__main__":
    sys.exit(main())
