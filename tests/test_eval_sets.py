"""Eval sets on disk: CLIP_benchmark's local layout (numbered shards, nshards.txt, KEY.cls, dataset_type.txt,
a train/ split for the probe), our first layout, synth → reader round trip, and the run's presence check."""
from __future__ import annotations

import json
import re

import pytest

from pipeline.config import Config, ConfigError
from pipeline.data import ShardWriter
from pipeline.data.synth import SHAPES
from pipeline.eval.sets import EvalSetError, is_eval_set, open_eval_set
from pipeline.eval.tasks import Encoder, captions_of, class_labels, run_task
from pipeline.models import load_published
from pipeline.run import ensure_data
from tests.helpers.data import image_bytes, write_benchmark_set
from tests.helpers.eval import EVAL_DATA, eval_config, publish

CLASSES = "cat\ndog\nbird\n"


def labelled(key: str, label: bytes, colour=(200, 30, 30), **extra: bytes) -> tuple[str, dict[str, bytes]]:
    return key, {"png": image_bytes(colour, 8, "PNG"), "cls": label, **extra}


def test_cls_labels_read_back_in_shard_number_order(tmp_path):
    """11 shards: a listing sorts 10.tar before 2.tar; nshards.txt means 0.tar … 10.tar in that order."""
    shards = [[labelled(f"s{i:07d}", str(i % 3).encode())] for i in range(11)]
    write_benchmark_set(tmp_path / "pets", {"test": shards}, classnames=CLASSES,
                        zeroshot_classification_templates="a photo of a {c}.\na {c}.\n")
    s = open_eval_set(str(tmp_path), "pets")
    assert s.kind == "zeroshot" and s.classnames == ["cat", "dog", "bird"]
    assert s.templates == ["a photo of a {c}.", "a {c}."] and s.train_shards is None
    samples = list(s.samples())
    assert [x.key for x in samples] == [f"s{i:07d}" for i in range(11)]
    assert [x.label for x in samples] == [i % 3 for i in range(11)]
    assert class_labels(s, samples).tolist() == [i % 3 for i in range(11)]


def test_nshards_is_honoured(tmp_path):
    shards = [[labelled(f"k{i}", b"0")] for i in range(3)]
    write_benchmark_set(tmp_path / "two", {"test": shards}, nshards={"test": "2\n"}, classnames=CLASSES)
    assert [x.key for x in open_eval_set(str(tmp_path), "two").samples()] == ["k0", "k1"]
    write_benchmark_set(tmp_path / "four", {"test": shards}, nshards={"test": "4\n"}, classnames=CLASSES)
    with pytest.raises(EvalSetError, match=r"'four'.*nshards.txt says 4 shards but 3.tar is missing"):
        open_eval_set(str(tmp_path), "four")
    write_benchmark_set(tmp_path / "words", {"test": shards}, nshards={"test": "three"}, classnames=CLASSES)
    with pytest.raises(EvalSetError, match="'three'; expected the number of shards"):
        open_eval_set(str(tmp_path), "words")


def test_dataset_type_decides_retrieval_and_refuses_multilabel(tmp_path):
    caption = [("a", {"jpg": image_bytes(), "txt": b"a red square\na square, red\n"}),
               ("b", {"jpg": image_bytes(), "txt": b"a blue thing"})]
    write_benchmark_set(tmp_path / "coco", {"test": [caption]}, dataset_type="retrieval\n")
    s = open_eval_set(str(tmp_path), "coco")
    assert s.kind == "retrieval"
    assert captions_of(s, list(s.samples())) == (["a red square", "a square, red", "a blue thing"], [0, 0, 1])
    write_benchmark_set(tmp_path / "voc", {"test": [caption]}, dataset_type="multilabel\n")
    with pytest.raises(EvalSetError, match="'multilabel'.*not supported"):
        open_eval_set(str(tmp_path), "voc")
    write_benchmark_set(tmp_path / "nameless", {"test": [[labelled("a", b"0")]]}, dataset_type="classification\n")
    with pytest.raises(EvalSetError, match="needs classnames.txt"):
        open_eval_set(str(tmp_path), "nameless")


@pytest.mark.parametrize("sample, classnames, message", [
    (labelled("bad", b"one"), CLASSES, r"sample 'bad': bad_label"),
    (labelled("neg", b"-1"), CLASSES, r"sample 'neg': bad_label"),
    (labelled("both", b"1", json=b'{"label": 2}'), CLASSES, "label_mismatch: .cls says 1, .json says 2"),
    (labelled("ok", b"0"), "cat\n\ndog\n", "blank line"),
    (labelled("ok", b"0"), "cat\n", None),
])
def test_label_and_classname_problems_are_named(tmp_path, sample, classnames, message):
    write_benchmark_set(tmp_path / "set", {"test": [[sample]]}, classnames=classnames)
    if message is None:                                       # a well-formed set whose label is out of range
        s = open_eval_set(str(tmp_path), "set")
        s.classnames = []
        with pytest.raises(EvalSetError, match=r"labels span \[0, 0\] but 0 class names"):
            class_labels(s, list(s.samples()))
        return
    with pytest.raises(EvalSetError, match=message):
        list(open_eval_set(str(tmp_path), "set").samples())


def test_our_first_layout_still_reads(tmp_path):
    """Shards and manifest.json directly in SET/, labels in KEY.json (Fashion-MNIST's conversion, old synth)."""
    with ShardWriter(str(tmp_path / "old"), 2) as writer:
        for i in range(3):
            writer.write(f"{i:03d}", {"jpg": image_bytes(), "json": json.dumps({"label": 2 - i}).encode()})
        writer.close()
    (tmp_path / "old" / "classnames.txt").write_text(CLASSES)
    s = open_eval_set(str(tmp_path), "old")
    assert s.kind == "zeroshot" and s.templates == ["{c}"] and len(s.shards) == 2
    assert [x.label for x in s.samples()] == [2, 1, 0]
    assert is_eval_set(str(tmp_path / "old")) and not is_eval_set(str(tmp_path / "nothing"))


@pytest.fixture(scope="module")
def data(synth):
    return synth(**EVAL_DATA)


def test_synth_sets_round_trip_through_the_reader(data):
    eval_dir = str(data / "eval")
    shape = re.compile("|".join(SHAPES))
    for name in ("zeroshot_seen", "zeroshot_heldout"):
        s = open_eval_set(eval_dir, name)
        samples = list(s.samples())
        assert s.kind == "zeroshot" and len(samples) == EVAL_DATA["eval_samples"] and s.train_shards is None
        for x in samples:                                    # the label names the class the caption describes
            assert x.caption == f"a photo of a {s.classnames[x.label]}."
            assert shape.search(s.classnames[x.label])
    retrieval = open_eval_set(eval_dir, "retrieval")
    texts, owner = captions_of(retrieval, list(retrieval.samples()))
    assert retrieval.kind == "retrieval" and len(texts) == 3 * EVAL_DATA["eval_samples"] == len(owner)
    relation = open_eval_set(eval_dir, "relation")
    assert relation.kind == "relation" and all("swapped" in x.meta for x in relation.samples())


RED, BLUE = (220, 20, 20), (20, 20, 220)


def colour_samples(prefix: str, red_label: int, n: int = 8) -> list[tuple[str, dict[str, bytes]]]:
    """n red and n blue images (slightly varied), red labelled `red_label`, blue the other class."""
    out = []
    for i in range(n):
        for colour, label in ((RED, red_label), (BLUE, 1 - red_label)):
            varied = tuple(min(255, c + 3 * i) for c in colour)
            out.append((f"{prefix}{label}_{i}", {"png": image_bytes(varied, 16, "PNG"), "cls": str(label).encode()}))
    return out


def test_linear_probe_fits_on_the_train_split(data, tmp_path):
    """The train split's labels are the test split's swapped: a probe fitted on train/ scores 0 on test/,
    while a set without train/ (the probe on a split of test/) scores 1."""
    cfg = eval_config(data, tmp_path / "run")
    encoder = Encoder(load_published(publish(cfg, step=1)), batch_size=32)
    test = [colour_samples("t", red_label=0)]
    write_benchmark_set(tmp_path / "sets" / "with_train", {"test": test, "train": [colour_samples("r", red_label=1)]},
                        classnames="red\nblue\n")
    write_benchmark_set(tmp_path / "sets" / "test_only", {"test": test}, classnames="red\nblue\n")
    with_train = open_eval_set(str(tmp_path / "sets"), "with_train")
    assert with_train.train_shards == [str(tmp_path / "sets" / "with_train" / "train" / "0.tar")]
    assert run_task(encoder, with_train, 0.5)["linear_probe_acc1"] == 0.0
    assert run_task(encoder, open_eval_set(str(tmp_path / "sets"), "test_only"), 0.5)["linear_probe_acc1"] == 1.0
    bad_train = [[("r0", {"png": image_bytes(RED, 16, "PNG"), "cls": b"5"})]]     # a label with no class name
    write_benchmark_set(tmp_path / "sets" / "bad_train", {"test": test, "train": bad_train}, classnames="red\nblue\n")
    with pytest.raises(EvalSetError, match=r"'bad_train': labels span \[5, 5\] but 2 class names"):
        run_task(encoder, open_eval_set(str(tmp_path / "sets"), "bad_train"), 0.5)     # an error, not a skipped probe


def test_run_sees_whole_eval_sets_and_names_missing_ones(data, tmp_path):
    cfg = Config()
    cfg.data.train_urls = [str(data / "train")]
    cfg.data.eval_dir = str(data / "eval")
    cfg.eval.sets = ["zeroshot_seen", "zeroshot_heldout", "retrieval", "relation"]
    ensure_data(cfg)                                          # all there: nothing to synthesise (samples = 0)
    cfg.data.eval_dir = str(tmp_path)
    write_benchmark_set(tmp_path / "unfinished", {"test": [[labelled("a", b"0")]]}, classnames=CLASSES)
    (tmp_path / "unfinished" / "test" / "nshards.txt").unlink()      # written last: the set is not whole
    cfg.eval.sets = ["unfinished"]
    with pytest.raises(ConfigError, match="unfinished"):
        ensure_data(cfg)
