"""The streaming reader: world-size and worker independence, exact resume, epochs, bad data, URLs."""
from __future__ import annotations

import io
import json

import pytest
import torch
from PIL import Image

from pipeline.data import DataError, merge_states, synthesize, train_tokenizer
from pipeline.data.transforms import centre_box, decode_image, draft_box
from tests.helpers.data import image_bytes, make_shard
from tests.helpers.stream import assert_same, global_batches, open_, take

G = 16


@pytest.fixture(scope="module")
def data(synth) -> str:
    """8 shards of 25 samples (200 samples), 32x32 images."""
    return str(synth(200, eval_samples=20, shard_size=25, seed=5) / "train")


def test_batch_contents(data):
    (batch,) = take(open_(data), 1)
    assert batch["image"].shape == (G, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["text"].shape == (G, 16) and batch["text"].dtype == torch.long
    assert len(batch["key"]) == G == len(set(batch["key"]))
    assert batch["label"].shape == (G,)
    assert -2.5 < float(batch["image"].mean()) < 2.5 and float(batch["image"].std()) > 0.2   # normalised


@pytest.mark.parametrize("world_size,num_workers", [(2, 0), (4, 0), (1, 2), (2, 2)])
def test_global_batches_do_not_depend_on_world_size_or_workers(data, world_size, num_workers):
    reference, _ = global_batches(data, 1, 6, streams=4)
    batches, _ = global_batches(data, world_size, 6, num_workers=num_workers, streams=4)
    assert_same(batches, reference)


def test_auto_streams_are_the_same_for_world_sizes_1_2_4(data):
    reference, states = global_batches(data, 1, 3)
    assert states[0]["num_streams"] == 8                 # chosen from the global batch only
    for w in (2, 4):
        assert_same(global_batches(data, w, 3)[0], reference)


def test_exact_resume_same_and_other_world_size(data):
    full, _ = global_batches(data, 1, 30)               # 30 x 16 = 480 samples: past the 200-sample epoch
    _, states = global_batches(data, 2, 12)
    text = json.dumps(merge_states(states))
    assert len(text) < 8192                              # a small JSON position
    state = json.loads(text)
    for w in (1, 2, 4):
        resumed, _ = global_batches(data, w, 18, state=state)
        assert_same(resumed, full[12:])
    # each rank can resume from its own state with the same world size
    for r in range(2):
        (batch,) = take(open_(data, rank=r, world_size=2, state=states[r]), 1)
        assert batch["key"] == full[12]["key"][r * 8:(r + 1) * 8]


def test_resume_with_workers_after_partial_iteration(data):
    full, _ = global_batches(data, 1, 10)
    stream = open_(data, num_workers=2)
    take(stream, 4)                                      # workers have prefetched beyond step 4
    state = stream.state_dict()
    assert state["step"] == 4
    assert_same(take(open_(data, state=state), 6), full[4:])
    assert_same(take(stream, 6), full[4:])               # a new iterator continues after the last batch taken


def test_epochs_cover_every_sample_once_and_reshuffle(data):
    (stream_1,) = [open_(data, global_batch=8, streams=1)]
    keys = [k for b in take(stream_1, 50) for k in b["key"]]   # 400 samples: two epochs of 200
    first, second = keys[:200], keys[200:]
    assert len(set(first)) == 200 and set(first) == set(second)
    assert first != second


def test_a_list_of_urls_is_one_shard_list(data):
    listed = [f"{data}/{{00000..00003}}.tar", f"file://{data}/{{00004..00007}}.tar"]
    assert_same(take(open_(listed, tokenizer=f"{data}/tokenizer.json"), 2),
                take(open_(f"{data}/{{00000..00007}}.tar"), 2))


def test_seed_changes_the_order(data):
    a = [k for b in take(open_(data, seed=1), 3) for k in b["key"]]
    b = [k for b in take(open_(data, seed=2), 3) for k in b["key"]]
    assert a != b and len(set(a)) == len(a)


def test_resampled_mode_handles_fewer_shards_than_streams(tmp_path):
    out = tmp_path / "few"
    synthesize(str(out), 40, eval_samples=4, image_size=32, shard_size=20, progress=False)  # 2 shards
    stream = open_(str(out / "train"), resampled=True)
    batches = take(stream, 10)                           # 160 rows from 40 samples: no epochs, no hang
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == 160 and len(set(keys)) <= 40
    again = take(open_(str(out / "train"), resampled=True, state=stream.state_dict()), 1)
    assert len(again[0]["key"]) == G


def test_incompatible_settings_fail_clearly(data):
    with pytest.raises(DataError, match="compatible world sizes: \\[1, 2, 4\\]"):
        open_(data, streams=4, world_size=3, global_batch=12)
    state = open_(data).state_dict()
    _, states = global_batches(data, 2, 1)
    with pytest.raises(DataError, match="train.global_batch: saved 16, now 32"):
        open_(data, global_batch=32, state=states[0])
    with pytest.raises(DataError, match="seed"):
        open_(data, seed=99, state=states[0])
    with pytest.raises(DataError, match="no position for virtual streams \\[4, 5, 6, 7\\]"):
        open_(data, world_size=2, rank=1, state=states[0])
    assert state["step"] == 0
    assert open_(data, world_size=4, num_workers=5).num_workers == 2       # capped at the rank's 2 streams


@pytest.fixture
def broken(tmp_path):
    """Four shards of 40 samples with one corrupt JPEG, one missing and one non-UTF-8 caption, one
    missing image, and a truncated tar; a tokenizer beside them."""
    good = lambda i: (f"s{i:04d}", {"jpg": image_bytes(), "txt": f"a red square {i}".encode()})  # noqa: E731
    for s in range(4):
        samples = [good(s * 100 + i) for i in range(40)]
        if s == 0:
            samples[3] = ("bad_jpeg", {"jpg": image_bytes()[:40] + b"\x00" * 50, "txt": b"broken"})
            samples[5] = ("no_caption", {"jpg": image_bytes()})
            samples[7] = ("latin1", {"jpg": image_bytes(), "txt": "caf\xe9".encode("latin-1")})
            samples[9] = ("no_image", {"txt": b"only words"})
        make_shard(tmp_path / f"{s:05d}.tar", samples)
    data = (tmp_path / "00003.tar").read_bytes()
    (tmp_path / "00003.tar").write_bytes(data[: len(data) // 2])            # truncated mid-shard
    train_tokenizer(["a red square"], vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_bad_samples_are_skipped_and_counted(broken):
    stream = open_(str(broken / "{00000..00003}.tar"), global_batch=8, streams=2, max_bad_fraction=0.5)
    keys = [k for b in take(stream, 30) for k in b["key"]]
    assert not {"bad_jpeg", "no_caption", "latin1", "no_image"} & set(keys)
    stats = stream.stats()
    assert stats["bad"]["corrupt_image"] >= 1 and stats["bad"]["missing_caption"] >= 1
    assert stats["bad"]["bad_caption_encoding"] >= 1 and stats["bad"]["missing_image"] >= 1
    assert stats["bad"]["truncated_shard"] >= 1
    assert "00000.tar" in stats["bad_shards"] and "00003.tar" in stats["bad_shards"]


def test_too_many_bad_samples_stop_the_run_naming_the_shards(broken):
    stream = open_(str(broken / "{00000..00003}.tar"), global_batch=8, streams=2, max_bad_fraction=0.01)
    with pytest.raises(DataError, match=r"over data.max_bad_fraction = 0.01.*00000.tar"):
        take(stream, 30)


def test_unusable_data_raises_instead_of_hanging(tmp_path):
    make_shard(tmp_path / "a.tar", [(f"k{i}", {"jpg": image_bytes()}) for i in range(5)])       # no captions
    (tmp_path / "b.tar").write_bytes(b"not a tar at all" * 10)
    train_tokenizer(["x"], vocab_size=260).save(str(tmp_path / "tokenizer.json"))
    stream = open_(str(tmp_path / "{a,b}.tar"), global_batch=4, streams=2, max_bad_fraction=1.0)
    with pytest.raises(DataError, match="virtual stream"):
        take(stream, 1)


def test_pipe_urls_need_opting_in(data):
    url = f"pipe:cat {data}/0000{{0..7}}.tar"
    with pytest.raises(DataError, match="allow_pipe"):
        open_(url, tokenizer=f"{data}/tokenizer.json")
    reference = take(open_(data), 2)
    piped = take(open_(url, tokenizer=f"{data}/tokenizer.json", allow_pipe=True), 2)
    assert_same(piped, reference)                        # the same shards in the same order


def test_memory_filesystem_write_and_read(data):
    """Synthesis writes through fsspec (memory://) the same bytes it writes locally; the reader reads them."""
    import fsspec
    synthesize("memory://stream-test", 200, eval_samples=20, image_size=32, shard_size=25, seed=5, progress=False)
    fs = fsspec.filesystem("memory")
    with open(f"{data}/00003.tar", "rb") as f:
        assert fs.cat_file("/stream-test/train/00003.tar") == f.read()
    assert_same(take(open_("memory://stream-test/train"), 3), take(open_(data), 3))


def test_http(data):
    """Brace patterns over http:// (a local server on 127.0.0.1), read through the fsspec opener."""
    import functools
    import http.server
    import threading
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=data)
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        got = take(open_(url + "/{00000..00007}.tar", tokenizer=url + "/tokenizer.json"), 2)
        assert_same(got, take(open_(f"{data}/{{00000..00007}}.tar"), 2))
        assert_same(take(open_(url + "/manifest.json"), 2), take(open_(data), 2))
    finally:
        server.shutdown()


def test_s3(data, s3_server):
    import s3fs
    fs = s3fs.S3FileSystem()
    fs.put(data + "/", "test-bucket/stream/", recursive=True)
    url = "s3://test-bucket/stream"
    assert_same(take(open_(url, num_workers=2), 3), take(open_(data), 3))
    assert_same(take(open_(url + "/{00000..00007}.tar", tokenizer=url + "/tokenizer.json"), 2),
                take(open_(f"{data}/{{00000..00007}}.tar"), 2))


def test_draft_decoding_matches_full_decoding():
    """Reduced-size JPEG decoding gives nearly the image of a full decode, crop and resize."""
    rng_img = torch.Generator().manual_seed(0)
    pixels = (torch.rand(64, 64, 3, generator=rng_img) * 255).byte().numpy()
    big = Image.fromarray(pixels).resize((512, 512), Image.BICUBIC)
    out = io.BytesIO()
    big.save(out, format="JPEG", quality=95)
    fast = decode_image(out.getvalue(), 64)
    slow = decode_image(out.getvalue(), 64, draft=False)
    assert fast.shape == slow.shape == (64, 64, 3)
    assert abs(fast.astype(float) - slow.astype(float)).mean() < 6
    img = Image.open(io.BytesIO(out.getvalue()))
    box = draft_box(img, centre_box(512, 512), 64)
    assert img.size == (64, 64) and box == (0, 0, 64, 64)           # decoded at 1/8 scale


# --------------------------------------------------------------------- any number of shards
def test_one_shard_with_eight_streams(synth):
    """One shard of 64 samples split among 8 streams at sample granularity: each epoch (4 batches of 16)
    holds every sample once, on any world size, and a resume continues exactly."""
    data = str(synth(64, shard_size=64, seed=11) / "train")
    full, _ = global_batches(data, 1, 12)
    assert global_batches(data, 1, 1)[1][0]["num_streams"] == 8
    for epoch in range(3):
        keys = [k for b in full[4 * epoch:4 * epoch + 4] for k in b["key"]]
        assert len(keys) == 64 == len(set(keys))
    assert [k for b in full[:4] for k in b["key"]] != [k for b in full[4:8] for k in b["key"]]   # reshuffled
    for w in (2, 4):
        assert_same(global_batches(data, w, 12)[0], full)
    _, states = global_batches(data, 2, 5)
    assert_same(global_batches(data, 4, 7, state=merge_states(states))[0], full[5:])


def test_a_hundred_tiny_shards_with_eight_streams(tmp_path):
    """100 shards of 3 samples (no manifest: counted) and 8 streams: no sample twice before every stream
    has read its part of the epoch, all of them by then, the same batches on any world size or number
    of loader processes, and an exact resume."""
    for s in range(100):
        make_shard(tmp_path / f"{s:03d}.tar",
                   [(f"s{s:03d}_{i}", {"jpg": image_bytes((s, 40 * i, 90)), "txt": f"shard {s} sample {i}".encode()})
                    for i in range(3)])
    train_tokenizer(["shard sample"], vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    url = str(tmp_path / "{000..099}.tar")
    full, _ = global_batches(url, 1, 20)                 # each stream's part is 37 or 38 samples, 2 per batch
    keys = [k for b in full for k in b["key"]]
    assert len(set(keys[:18 * 16])) == 18 * 16           # 36 per stream: nothing repeats
    assert len(set(keys[:19 * 16])) == 300               # 38 per stream: every part read
    for world, workers in ((2, 0), (4, 0), (2, 2)):
        assert_same(global_batches(url, world, 20, num_workers=workers)[0], full)
    _, states = global_batches(url, 4, 9)
    assert_same(global_batches(url, 1, 11, state=merge_states(states))[0], full[9:])


def test_too_little_data_for_one_global_batch_is_a_clear_error(tmp_path):
    make_shard(tmp_path / "a.tar", [(f"k{i}", {"jpg": image_bytes(), "txt": b"a red square"}) for i in range(10)])
    train_tokenizer(["a red square"], vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="holds 10 samples.*fewer than one global batch of 16"):
        open_(str(tmp_path / "a.tar"))
    with pytest.raises(DataError, match="10 samples, fewer than the 16 virtual streams.*resampled"):
        open_(str(tmp_path / "a.tar"), global_batch=32, streams=16)
    assert len(take(open_(str(tmp_path / "a.tar"), global_batch=8), 3)[2]["key"]) == 8


def test_a_manifest_counting_more_samples_than_a_shard_holds_counts_them_lost(data, tmp_path):
    """A stale manifest (a shard rewritten shorter): the missing positions are counted as bad, not a hang."""
    import shutil
    shutil.copytree(data, tmp_path / "d")
    manifest = json.loads((tmp_path / "d/manifest.json").read_text())
    manifest["shards"][0]["samples"] += 5
    (tmp_path / "d/manifest.json").write_text(json.dumps(manifest))
    stream = open_(str(tmp_path / "d"), max_bad_fraction=1.0)
    take(stream, 20)                                      # 320 rows: past one epoch of 205 positions
    assert stream.stats()["bad"] == {"short_shard": 5}


# -------------------------------------------------------------------------- bad-sample budget
def test_bad_samples_count_when_consumed_like_good_ones(tmp_path):
    """Regression (issue 17, item 4): 1% bad samples spread over a shard read in one window of 800 must
    not look like 4% after 200 rows (all of the window's bad ones counted at once, good ones as taken)."""
    samples = [(f"k{i:04d}", {"jpg": image_bytes((i % 250, 20, 20))} if i % 100 == 50 else
                {"jpg": image_bytes((i % 250, 20, 20)), "txt": f"sample {i}".encode()}) for i in range(800)]
    make_shard(tmp_path / "a.tar", samples)
    train_tokenizer(["sample"], vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    stream = open_(str(tmp_path / "a.tar"), global_batch=8, streams=1, shuffle_buffer=800, max_bad_fraction=0.03)
    take(stream, 25)                                      # 200 rows of the window of 800 (8 bad ones in it)
    stats = stream.stats()
    assert stats["ok"] == 200
    assert stats["bad"] == {"missing_caption": stats["bad_total"]} and stats["bad_total"] < 6
    assert stats["bad_fraction"] < 0.03


# --------------------------------------------------------------------------- caption ids
def test_caption_ids_identify_identical_captions(data):
    from pipeline.data.samples import caption_id
    assert caption_id("A white  star.") == caption_id("a white star.") == caption_id(" a WHITE star.\n")
    assert caption_id("a white star.") != caption_id("a white star")
    (batch,) = take(open_(data, global_batch=64), 1)
    ids, texts = batch["caption_id"].tolist(), batch["text"]
    for i in range(64):
        for j in range(64):
            assert (ids[i] == ids[j]) == torch.equal(texts[i], texts[j]), (i, j)


# ------------------------------------------------------------------------- loader processes
LOADER_SCRIPT = """
import os, sys, time, psutil
from pipeline.data import StreamOptions, open_stream
stream = open_stream(sys.argv[1], global_batch=16, num_workers=2, options=StreamOptions(image_size=32,
                     context_length=16, shuffle_buffer=20))
batches = iter(stream)
next(batches)
print(" ".join(str(p.pid) for p in psutil.Process().children()), flush=True)
time.sleep(600)
"""


def test_loader_processes_die_with_a_sigkilled_parent(data, tmp_path):
    """SIGKILL the process reading with 2 loader processes: they are gone within 2 s (torch's own check
    of the parent would take up to 5 s; without it they would live on)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil
    script = tmp_path / "reader.py"
    script.write_text(LOADER_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), data], stdout=subprocess.PIPE, text=True)
    try:
        loaders = [psutil.Process(int(p)) for p in proc.stdout.readline().split()]
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert len(loaders) == 2
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and any(_alive(p) for p in loaders):
        time.sleep(0.05)
    assert not any(_alive(p) for p in loaders), "a loader process outlived its parent"


def _alive(p) -> bool:
    import psutil
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_tar_urls_listed_one_by_one_take_their_counts_from_the_folders_manifest(data, tmp_path, caplog):
    from pipeline.data.shards import resolve_shards, with_counts
    with open(f"{data}/manifest.json") as f:
        manifest = json.load(f)
    tars = [f"{data}/{s['name']}" for s in manifest["shards"]]
    listed = resolve_shards(tars[:3] + [f"{data}/{{00003..00004}}.tar"])
    assert [s.samples for s in listed] == [s["samples"] for s in manifest["shards"][:5]]
    with caplog.at_level("INFO", logger="pipeline"):
        with_counts(listed)
    assert "without a manifest" not in caplog.text                  # nothing read to count
    lone = tmp_path / "lone"
    lone.mkdir()
    make_shard(lone / "a.tar", [("k0", {"txt": b"a red circle", "png": image_bytes()})])
    (no_manifest,) = resolve_shards([str(lone / "a.tar")])
    assert no_manifest.samples is None                               # counted by reading, as before


def test_several_captions_per_image(tmp_path):
    """data.captions_per_image = 3: KEY.txt's lines or the JSON's "captions"; a sample with fewer repeats
    its own in a cycle (all of them used); a malformed "captions" is a bad sample, counted."""
    from pipeline.data.samples import caption_id
    captions = {}
    samples = []
    for i in range(24):
        lines = [f"shape {i} view {a}" for a in range(3 if i % 2 else 2)]
        captions[f"k{i:03d}"] = lines
        members = {"jpg": image_bytes()}
        if i % 3:
            members["txt"] = "\n".join(lines).encode()
        else:
            members["json"] = json.dumps({"captions": lines}).encode()
        samples.append((f"k{i:03d}", members))
    samples.append(("bad", {"jpg": image_bytes(), "json": json.dumps({"captions": ["ok", " "]}).encode()}))
    make_shard(tmp_path / "a.tar", samples)
    train_tokenizer(["shape view"], vocab_size=300).save(str(tmp_path / "tokenizer.json"))
    stream = open_(str(tmp_path / "a.tar"), global_batch=8, streams=1, max_bad_fraction=0.5, captions_per_image=3)
    batches = take(stream, 4)            # past one epoch of 24 good samples
    for b in batches:
        assert b["more_text"].shape == (8, 2, 16) and b["caption_id"].shape == (8, 3)
        for key, ids in zip(b["key"], b["caption_id"].tolist()):
            own = [caption_id(t) for t in captions[key]]
            assert sorted(set(ids)) == sorted(own)                     # its own captions, every one of them
            assert len(set(ids)) == len(own)                           # 3 distinct, or 2 with one repeated
    assert "bad" not in {k for b in batches for k in b["key"]}
    assert stream.stats()["bad"]["bad_captions"] >= 1
    with pytest.raises(DataError, match="data.captions_per_image = 0"):
        open_(str(tmp_path / "a.tar"), captions_per_image=0)
