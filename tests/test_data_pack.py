"""Packing from each source shape, with bad inputs; atomic output; inspect on local and remote URLs."""
from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.data import DataError, StreamOptions, load_tokenizer, open_stream
from pipeline.data.inspection import inspect_shards
from pipeline.data.pack import Item, folder_items, img2dataset_items, pack, table_items
from tests.helpers.data import image_bytes, make_shard


def shard_members(out) -> dict[str, bytes]:
    members = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return members


def test_folder_with_class_subfolders_and_bad_files(tmp_path, capsys):
    src = tmp_path / "src"
    for cls, colour in (("red_apple", (220, 0, 0)), ("green_pear", (0, 200, 0))):
        (src / cls).mkdir(parents=True)
        for i in range(3):
            (src / cls / f"{i}.jpg").write_bytes(image_bytes(colour))
    (src / "red_apple" / "empty.jpg").write_bytes(b"")
    (src / "red_apple" / "cut.jpg").write_bytes(image_bytes((1, 2, 3), (300, 300))[:200])
    (src / "green_pear" / "logo.bmp").write_bytes(image_bytes((0, 0, 9), fmt="BMP"))
    out = tmp_path / "out"
    assert main(["-q", "data", "pack", "--folder", str(src), "--out", str(out), "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "packed 7 samples into 2 shards" in printed
    assert "empty_image: 1" in printed and "unreadable_image: 1" in printed and "cut.jpg" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["samples"] for s in manifest["shards"]] == [4, 3]
    members = shard_members(out)
    assert members["red_apple_0.txt"] == b"a photo of a red apple."
    assert json.loads(members["green_pear_1.json"]) == {"label": 0, "class": "green pear"}
    assert json.loads(members["red_apple_2.json"])["label"] == 1
    assert "green_pear_logo.png" in members                  # BMP re-encoded as PNG
    assert load_tokenizer(str(out)).vocab_size > 256


def test_folder_with_captions_beside_images(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"x{i}.png").write_bytes(image_bytes((0, 0, 200), fmt="PNG"))
        (src / f"x{i}.txt").write_text(f"a blue square number {i}")
    (src / "no_caption.jpg").write_bytes(image_bytes((0, 0, 0)))
    (src / "latin1.jpg").write_bytes(image_bytes((0, 0, 0)))
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "blank.jpg").write_bytes(image_bytes((0, 0, 0)))
    (src / "blank.txt").write_text("   \n")
    summary = pack(folder_items(str(src)), str(tmp_path / "out"), progress=False)
    assert summary.written == 3
    assert dict(summary.skipped) == {"missing_caption": 2, "bad_caption_encoding": 1}
    stream = open_stream(str(tmp_path / "out"), global_batch=3, options=StreamOptions(image_size=16, streams=1))
    batch = next(iter(stream))
    assert sorted(batch["caption"]) == [f"a blue square number {i}" for i in range(3)]


def write_table(tmp_path, kind):
    (tmp_path / "img").mkdir()
    rows = {"image": [], "caption": [], "key": []}
    for i in range(5):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(image_bytes((10 * i, 0, 0)))
        rows["image"].append(f"img/{i}.jpg")
        rows["caption"].append(f"picture {i}")
        rows["key"].append(f"k{i}")
    rows["image"] += ["img/missing.jpg", "img/0.jpg", "img/1.jpg"]
    rows["caption"] += ["gone", "same key again", None]
    rows["key"] += ["k5", "k0", "k7"]
    table = pa.table(rows)
    path = tmp_path / f"table.{kind}"
    if kind == "csv":
        import pyarrow.csv
        pyarrow.csv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    return path


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_tables(tmp_path, kind):
    path = write_table(tmp_path, kind)
    summary = pack(table_items(str(path), "image", "caption"), str(tmp_path / "out"), shard_size=2, progress=False)
    assert summary.written == 5 and summary.shards == 3
    assert dict(summary.skipped) == {"unreadable_image": 1, "duplicate_key": 1, "missing_caption": 1}
    members = shard_members(tmp_path / "out")
    assert members["k3.txt"] == b"picture 3" and "k0.jpg" in members
    with pytest.raises(DataError, match="no column url"):
        list(table_items(str(path), "url", "caption"))


def test_img2dataset_reshard_and_pixel_limit(tmp_path):
    src = tmp_path / "i2d"
    src.mkdir()
    for s in range(2):
        keys = [f"{s:05d}{i:04d}" for i in range(3)]
        make_shard(src / f"{s:05d}.tar", [
            (key, {"jpg": image_bytes((0, 90, 0), (120, 120) if (s, i) == (1, 2) else (24, 24)),
                   "txt": f"photo {key}".encode(), "json": json.dumps({"url": f"http://x/{key}", "key": key}).encode()})
            for i, key in enumerate(keys)])
        pq.write_table(pa.table({"key": [f"{s:05d}{i:04d}" for i in range(3)], "status": ["success"] * 3}),
                       src / f"{s:05d}.parquet")
    summary = pack(img2dataset_items(str(src)), str(tmp_path / "out"), shard_size=10, max_pixels=5000,
                   progress=False)
    assert summary.written == 5 and dict(summary.skipped) == {"too_many_pixels": 1}
    members = shard_members(tmp_path / "out")
    assert json.loads(members["000010001.json"])["url"] == "http://x/000010001"


def test_interrupted_pack_leaves_nothing(tmp_path):
    def items():
        for i in range(7):
            yield Item(f"k{i}", image_bytes((0, 0, 0)), b"caption", f"item {i}")
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        pack(items(), str(out), shard_size=3, progress=False)
    assert list(out.iterdir()) == []                          # two finished shards and one partial: all gone


def test_nothing_usable_is_an_error(tmp_path):
    with pytest.raises(DataError, match="every input was skipped"):
        pack(iter([Item("a", b"", b"x", "a")]), str(tmp_path / "out"), progress=False)


def test_inspect_local_memory_and_s3(tmp_path, s3_server, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        (src / f"{i}.jpg").write_bytes(image_bytes((0, 0, 100 + i)))
        (src / f"{i}.txt").write_text(f"image {i}")
    out = tmp_path / "out"
    pack(folder_items(str(src)), str(out), shard_size=2, progress=False)
    with tarfile.open(out / "00001.tar", "a") as tar:           # add a corrupt JPEG to the second shard
        bad = b"\xff\xd8\xff\xe0" + b"\x00" * 64
        for name, data in (("zz.jpg", bad), ("zz.txt", b"broken")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert main(["data", "inspect", str(out)]) == 1                 # problems found: exit 1
    printed = capsys.readouterr().out
    assert "total: 2 shards, 5 samples" in printed and "zz: corrupt_image" in printed
    assert "manifest says 2 samples, read 3" in printed and "jpg+txt (5)" in printed

    import fsspec
    import s3fs
    s3fs.S3FileSystem().put(str(out) + "/", "test-bucket/inspect/", recursive=True)
    mem = fsspec.filesystem("memory")
    for p in out.iterdir():
        mem.pipe_file(f"/inspect/{p.name}", p.read_bytes())
    for url in ("s3://test-bucket/inspect", "memory://inspect/manifest.json"):
        reports = inspect_shards(url)
        assert [r.samples for r in reports] == [2, 3]
        assert [r.bytes for r in reports] == [(out / "00000.tar").stat().st_size, (out / "00001.tar").stat().st_size]
        assert any("zz: corrupt_image" in p for p in reports[1].problems)
    assert main(["data", "inspect", "pipe:cat " + str(out / "00000.tar")]) == 1
    assert "pipe:" in capsys.readouterr().err


def class_folder(root, classes: dict[str, tuple[int, int, int]], n: int = 3):
    """root/CLASS/i.jpg for each class (n images of its colour, slightly varied)."""
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.jpg").write_bytes(image_bytes(tuple(min(255, c + 4 * i) for c in colour)))
    return root


def split_samples(split_dir) -> dict[str, dict[str, bytes]]:
    """Samples of a CLIP_benchmark split, read the way CLIP_benchmark does: 0.tar … N-1.tar from nshards.txt."""
    samples: dict[str, dict[str, bytes]] = {}
    for i in range(int((split_dir / "nshards.txt").read_text())):
        with tarfile.open(split_dir / f"{i}.tar") as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def test_pack_clip_benchmark_writes_a_zero_shot_set(tmp_path, capsys):
    from pipeline.data.pack import DEFAULT_TEMPLATES

    src = class_folder(tmp_path / "src", {"red_apple": (220, 0, 0), "green_pear": (0, 200, 0), "plum": (90, 0, 90)})
    (src / "plum" / "empty.jpg").write_bytes(b"")
    (src / "loose.jpg").write_bytes(image_bytes())                       # in no class folder
    out = tmp_path / "sets" / "fruit"
    assert main(["-q", "data", "pack", "--folder", str(src), "--clip-benchmark", "--out", str(out),
                 "--shard-size", "4"]) == 0
    printed = capsys.readouterr().out
    assert "packed 9 samples into 3 shards" in printed and "empty_image: 1" in printed
    assert "no_class_folder: 1" in printed and "loose.jpg" in printed
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar"]
    assert (out / "test" / "nshards.txt").read_text() == "3\n"
    assert (out / "classnames.txt").read_text().splitlines() == ["green pear", "plum", "red apple"]
    assert (out / "zeroshot_classification_templates.txt").read_text().splitlines() == list(DEFAULT_TEMPLATES)
    assert (out / "dataset_type.txt").read_text() == "classification\n"
    samples = split_samples(out / "test")
    assert len(samples) == 9
    for key, members in samples.items():                 # each label is its folder's line in classnames.txt
        folder = {"green_pear": b"0", "plum": b"1", "red_apple": b"2"}[key.rsplit("_", 1)[0]]
        assert members["cls"] == folder and "jpg" in members and "json" not in members
    assert samples["red_apple_1"]["txt"] == b"a photo of a red apple."


def test_pack_clip_benchmark_templates_and_a_train_split(tmp_path):
    from pipeline.eval.sets import open_eval_set

    colours = {"red": (220, 0, 0), "blue": (0, 0, 220)}
    test_src, train_src = class_folder(tmp_path / "test_src", colours), class_folder(tmp_path / "train_src", colours)
    out = tmp_path / "sets" / "colours"
    templates = tmp_path / "templates.txt"
    templates.write_text("a {c} thing.\n\nsomething {c}.\n")
    assert main(["-q", "data", "pack", "--folder", str(test_src), "--clip-benchmark", "--templates", str(templates),
                 "--out", str(out)]) == 0
    assert main(["-q", "data", "pack", "--folder", str(train_src), "--clip-benchmark", "--split", "train",
                 "--out", str(out)]) == 0
    s = open_eval_set(str(tmp_path / "sets"), "colours")
    assert s.kind == "zeroshot" and s.classnames == ["blue", "red"]
    assert s.templates == ["a {c} thing.", "something {c}."]                # kept when the train split came
    assert len(s.train_shards) == 1 and [x.label for x in s.train_samples()] == [0, 0, 0, 1, 1, 1]
    assert [x.caption for x in s.samples()][0] == "a blue thing."


@pytest.mark.parametrize("args, message", [
    (["--split", "train", "--templates", "{bad}"], "templates without a {c} placeholder"),
    (["--split", "train", "--folder", "{other}"], "differ from"),
    (["--folder", "{same}"], "already holds a packed split"),
    (["--split", "train", "--folder", "{flat}"], "no class subfolders"),
])
def test_pack_clip_benchmark_refusals_are_named(tmp_path, args, message, capsys):
    class_folder(tmp_path / "same", {"a": (1, 2, 3), "b": (4, 5, 6)}, n=1)
    class_folder(tmp_path / "other", {"a": (1, 2, 3), "c": (4, 5, 6)}, n=1)
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpg").write_bytes(image_bytes())
    (tmp_path / "bad").write_text("a photo of a thing.\n")
    out = tmp_path / "set"
    assert main(["-q", "data", "pack", "--folder", str(tmp_path / "same"), "--clip-benchmark", "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["-q", "data", "pack", "--clip-benchmark", "--out", str(out)]
    argv += [a.format(bad=tmp_path / "bad", other=tmp_path / "other", same=tmp_path / "same", flat=tmp_path / "flat")
             for a in args]
    if "--folder" not in argv:
        argv += ["--folder", str(tmp_path / "same")]
    assert main(argv) == 1
    assert message in capsys.readouterr().err
    assert (out / "classnames.txt").read_text() == "a\nb\n"               # the set is as it was


def test_templates_need_clip_benchmark(tmp_path, capsys):
    assert main(["-q", "data", "pack", "--folder", str(tmp_path), "--templates", "t.txt", "--out", "x"]) == 1
    assert "add --clip-benchmark" in capsys.readouterr().err


def test_img2dataset_keys_with_slashes_and_dots_are_sanitised_not_fatal(tmp_path):
    """Keys such as `a/b` or `../x` used to stop the pack and discard every shard already written."""
    src = tmp_path / "i2d"
    src.mkdir()
    keys = ["00000001", "sub/00000002", "../00000003", "x/../00000004", "00000005", "sub_00000002"]
    make_shard(src / "00000.tar", [(k, {"jpg": image_bytes((0, 90, 0)), "txt": f"photo {i}".encode()})
                                   for i, k in enumerate(keys)])
    summary = pack(img2dataset_items(str(src)), str(tmp_path / "out"), shard_size=2, progress=False)
    written = {name.rsplit(".", 1)[0] for name in shard_members(tmp_path / "out")}
    assert summary.written == 5 and dict(summary.skipped) == {"duplicate_key": 1}     # sub/… and sub_… collide
    assert all("/" not in k and "." not in k for k in written) and "sub_00000002" in written
