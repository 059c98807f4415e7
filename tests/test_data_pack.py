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
