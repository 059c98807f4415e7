"""The streaming reader: world-size and worker independence, exact resume, epochs, bad data, URLs."""
from __future__ import annotations

import dataclasses
import io
import json

import pytest
import torch
from PIL import Image

from pipeline.data import DataError, StreamOptions, merge_states, open_stream, synthesize, train_tokenizer
from pipeline.data.transforms import centre_box, decode_image, draft_box
from tests.helpers.data import image_bytes, make_shard

G = 16


@pytest.fixture(scope="module")
def data(synth) -> str:
    """8 shards of 25 samples (200 samples), 32x32 images."""
    return str(synth(200, eval_samples=20, shard_size=25, seed=5) / "train")


OPTIONS = {f.name for f in dataclasses.fields(StreamOptions)}


def open_(url, **kw):
    """`open_stream` with this module's defaults; StreamOptions fields may be given as keywords."""
    options = dict(image_size=32, context_length=16, shuffle_buffer=20)
    options.update({k: kw.pop(k) for k in list(kw) if k in OPTIONS})
    kw.setdefault("global_batch", G)
    kw.setdefault("seed", 3)
    return open_stream(url, options=StreamOptions(**options), **kw)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def global_batches(url, world_size, steps, num_workers=0, state=None, **kw):
    """The rank-major concatenation of all ranks' batches, step by step, plus each rank's final state."""
    ranks = [open_(url, rank=r, world_size=world_size, num_workers=num_workers, state=state, **kw)
             for r in range(world_size)]
    per_rank = [take(s, steps) for s in ranks]
    batches = [{"key": sum((p[t]["key"] for p in per_rank), []),
                "image": torch.cat([p[t]["image"] for p in per_rank]),
                "text": torch.cat([p[t]["text"] for p in per_rank])} for t in range(steps)]
    return batches, [s.state_dict() for s in ranks]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["key"] == y["key"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])


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
