"""WebDataset shards: writing tars atomically with a manifest, resolving shard URLs, reading samples.

A shard is a tar of samples ``KEY.jpg`` (or .png/.webp), ``KEY.txt`` and optional ``KEY.json``; the
members of one sample are adjacent. ``manifest.json`` beside the shards lists each shard's name,
sample count and byte size. A folder in CLIP_benchmark's layout names its shards ``0.tar`` …
``N-1.tar`` and gives N in ``nshards.txt``; the writer can add that, and the resolver reads it.
Reading goes through webdataset's tar iterator and its ``gopen`` table, in which
`pipeline.storage.register_webdataset_opener` puts fsspec (so ``s3://``, ``memory://`` work).
"""
from __future__ import annotations

import io
import os
import posixpath
import tarfile
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional, Sequence, Union

import braceexpand

from pipeline import storage
from pipeline.layout import EVAL_TEST, MANIFEST, NSHARDS, numbered_shard
from pipeline.log import get_logger

log = get_logger(__name__)


class DataError(RuntimeError):
    """Data that cannot be streamed: the message names the shards and what was expected."""


# -------------------------------------------------------------------------------------- writing
class ShardWriter:
    """Write samples into numbered tars of `shard_size` samples, then `manifest.json`.

    Each tar is built in a local temporary file and only then renamed (local) or uploaded (object
    stores publish an object when its upload completes). Used as a context manager, an error or an
    interrupt removes every shard of this writer: nothing half-written is left, and no manifest.
    With `numbered`, shards are named CLIP_benchmark's way (``0.tar``, ``1.tar``, …) and ``nshards.txt``
    is written after the manifest.
    """

    def __init__(self, out_url: str, shard_size: int = 1000, prefix: str = "", numbered: bool = False):
        if shard_size < 1:
            raise ValueError(f"shard_size = {shard_size}: expected at least 1")
        self.out_url = str(out_url).rstrip("/")
        self.shard_size = shard_size
        self.prefix = prefix
        self.numbered = numbered
        self.shards: list[dict[str, Any]] = []
        self._tmp: Optional[Any] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0
        storage.makedirs(self.out_url)

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Add one sample: `members` maps extension (``jpg``, ``txt``, ``json``) to bytes."""
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r}: expected no '.' or '/' (webdataset splits names at the first dot)")
        if self._tar is None:
            self._open()
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        if self._count >= self.shard_size:
            self._finish()

    def flush(self) -> None:
        """Finish the shard being written (it may hold fewer than shard_size samples)."""
        if self._tar is not None:
            self._finish()

    def close(self, **manifest_extra: Any) -> dict[str, Any]:
        """Finish the last shard and write the manifest (last, so a manifest means a whole dataset)."""
        self.flush()
        manifest = {"format": "webdataset", "version": 1, "shards": self.shards,
                    "samples": sum(s["samples"] for s in self.shards), **manifest_extra}
        storage.write_json(storage.join(self.out_url, MANIFEST), manifest)
        if self.numbered:
            storage.write_bytes(storage.join(self.out_url, NSHARDS), f"{len(self.shards)}\n".encode())
        return manifest

    def abort(self) -> None:
        """On an error or an interrupt: drop the shard being written and the shards already written."""
        if self._tar is not None:
            self._tar.close()
            self._tmp.close()
            os.unlink(self._tmp.name)
            self._tar = self._tmp = None
        for shard in self.shards:
            storage.remove(storage.join(self.out_url, shard["name"]))
        self.shards = []

    def _name(self) -> str:
        return numbered_shard(len(self.shards)) if self.numbered else f"{self.prefix}{len(self.shards):05d}.tar"

    def _open(self) -> None:
        self._tmp = tempfile.NamedTemporaryFile(prefix=".shard-", suffix=".tar", delete=False,
                                                dir=self._tmp_dir())
        self._tar = tarfile.open(fileobj=self._tmp, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _tmp_dir(self) -> Optional[str]:
        """Local outputs: a temporary file in the output folder, so the final rename is atomic."""
        return storage.local_path(self.out_url) if storage.is_local(self.out_url) else None

    def _finish(self) -> None:
        self._tar.close()
        self._tmp.close()
        name, tmp = self._name(), self._tmp.name
        size = os.path.getsize(tmp)
        dest = storage.join(self.out_url, name)
        if storage.is_local(dest):
            os.replace(tmp, storage.local_path(dest))
        else:
            fs, path = storage.filesystem(dest)
            fs.put_file(tmp, path)
            os.unlink(tmp)
        self.shards.append({"name": name, "samples": self._count, "bytes": size})
        self._tar = self._tmp = None
        self._count = 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, etype, value, tb) -> None:
        if etype is not None:
            self.abort()


# ------------------------------------------------------------------------------------- resolving
@dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int] = None          # from the manifest, when there is one

    @property
    def name(self) -> str:
        return posixpath.basename(self.url)


def resolve_shards(urls: str | Sequence[str], allow_pipe: bool = False) -> list[Shard]:
    """Shard URLs from a URL, brace pattern, dataset folder, manifest.json, or a list of these."""
    items = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    if not items:
        raise DataError("no shard URLs given: expected a dataset folder, a manifest.json, tar URLs or a brace pattern")
    shards: list[Shard] = []
    for item in items:
        item = str(item)
        if item.startswith("pipe:"):
            if not allow_pipe:
                raise DataError(f"{item}: `pipe:` URLs run shell commands and are refused; set data.allow_pipe=true "
                                "to allow them for data you trust")
            shards.extend(Shard(u) for u in braceexpand.braceexpand(item))
        elif item.rstrip("/").endswith(MANIFEST):
            shards.extend(_from_manifest(item.rstrip("/")))
        elif "{" in item or item.endswith(".tar"):
            shards.extend(Shard(u) for u in braceexpand.braceexpand(item))
        else:
            shards.extend(_from_folder(item.rstrip("/")))
    return _counts_from_manifests(shards)


def _counts_from_manifests(shards: list[Shard]) -> list[Shard]:
    """Shards named one by one (tar URLs, brace patterns) take their sample counts from the manifest.json
    of their folder when it lists them: one read per folder instead of reading every tar to count it."""
    folders = {posixpath.dirname(s.url) for s in shards if s.samples is None and not s.url.startswith("pipe:")}
    counts: dict[str, int] = {}
    for folder in folders:
        if storage.exists(storage.join(folder, MANIFEST)):
            counts.update((s.url, s.samples) for s in _from_manifest(storage.join(folder, MANIFEST)))
    return [replace(s, samples=counts[s.url]) if s.samples is None and s.url in counts else s for s in shards]


COUNT_THREADS = 16                         # shards counted at once (the work is mostly waiting for bytes)


def with_counts(shards: Sequence[Shard]) -> list[Shard]:
    """`shards` with every sample count known: the manifest's, else counted by reading the shard once.

    A broken shard counts the samples before the break plus one, so that a reader meets the break
    and counts it as lost. Counting reads whole tars: give a manifest.json for large remote data.
    """
    missing = [s for s in shards if s.samples is None]
    if not missing:
        return list(shards)
    log.info("counting the samples of %d shards without a manifest (a manifest.json beside them avoids this)",
             len(missing))
    _tar_reader()                                      # imported here: a first import in several threads races
    with ThreadPoolExecutor(min(COUNT_THREADS, len(missing))) as pool:
        counted = dict(zip([s.url for s in missing], pool.map(count_samples, [s.url for s in missing])))
    return [s if s.samples is not None else replace(s, samples=counted[s.url]) for s in shards]


def count_samples(url: str) -> int:
    """Samples in one tar as the reader sees them; a break counts as one more."""
    n = 0
    try:
        for _ in read_shard(url):
            n += 1
    except Exception:                                  # unreadable or truncated: the reader will find it
        return n + 1
    return n


def _from_manifest(url: str) -> list[Shard]:
    manifest = storage.read_json(url)
    base = url[: -len(MANIFEST)].rstrip("/")
    try:
        return [Shard(storage.join(base, s["name"]), int(s["samples"])) for s in manifest["shards"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"{url}: expected a manifest with 'shards': [{{'name', 'samples', 'bytes'}}, ...] "
                        f"({e})") from None


def _from_folder(url: str) -> list[Shard]:
    if storage.exists(storage.join(url, MANIFEST)):
        return _from_manifest(storage.join(url, MANIFEST))
    if storage.exists(storage.join(url, NSHARDS)):
        return _from_nshards(url)
    tars = list(storage.iter_files(url, ".tar"))
    if not tars:
        where = f" (a relative path, read from {os.getcwd()})" if storage.is_local(url) and not os.path.isabs(
            storage.local_path(url)) else ""
        split = " (an eval set in CLIP_benchmark's layout: its shards are in test/)" if storage.exists(
            storage.join(url, EVAL_TEST, NSHARDS)) else ""
        raise DataError(f"{url}{where}: no manifest.json and no .tar files{split}; expected a dataset folder written "
                        "by `contrast data synth` or `contrast data pack`, tar URLs, or a brace pattern")
    return [Shard(t) for t in tars]


def _from_nshards(url: str) -> list[Shard]:
    """CLIP_benchmark's split folder: exactly ``0.tar`` … ``N-1.tar`` for the N in nshards.txt, all present."""
    text = storage.read_bytes(storage.join(url, NSHARDS)).decode("utf-8", "replace").strip()
    if not text.isdigit() or int(text) < 1:
        raise DataError(f"{storage.join(url, NSHARDS)}: {text[:40]!r}; expected the number of shards (a positive "
                        "integer)")
    names = [numbered_shard(i) for i in range(int(text))]
    present = {posixpath.basename(u) for u in storage.iter_files(url, ".tar")}
    missing = [n for n in names if n not in present]
    if missing:
        raise DataError(f"{url}: nshards.txt says {len(names)} shards but {', '.join(missing[:5])} "
                        f"{'is' if len(missing) == 1 else 'are'} missing")
    return [Shard(storage.join(url, n)) for n in names]


def dataset_dir(urls: str | Sequence[str]) -> Optional[str]:
    """The folder of the first dataset folder or manifest among `urls` (where tokenizer.json lives)."""
    first = str(urls if isinstance(urls, (str, os.PathLike)) else (list(urls) or [""])[0]).rstrip("/")
    if first.endswith(MANIFEST):
        return first[: -len(MANIFEST)].rstrip("/")
    if first.endswith(".tar") or "{" in first:
        return posixpath.dirname(first) or "."
    return first or None


# --------------------------------------------------------------------------------------- reading
@dataclass
class RawSample:
    """One sample's members as bytes, keyed by lower-case extension."""
    key: str
    members: dict[str, bytes]
    shard: str


def read_shard(url: str) -> Iterator[RawSample]:
    """The samples of one tar, in order. Raises on an unreadable or truncated tar (after the good part)."""
    gopen, base_plus_ext, tar_file_iterator = _tar_reader()
    stream = _TailReader(gopen(url, "rb"))
    try:
        current: Optional[RawSample] = None
        for item in tar_file_iterator(stream, skip_meta=None):
            prefix, ext = base_plus_ext(item["fname"])
            if prefix is None:
                continue
            if current is None or prefix != current.key:
                if current is not None:
                    yield current
                current = RawSample(prefix, {}, url)
            current.members[ext.lower()] = item["data"]
        stream.check_end()
        if current is not None:
            yield current
    finally:
        stream.close()


def _tar_reader() -> tuple[Any, Any, Any]:
    """webdataset's opener (with fsspec registered in it), name splitter and tar iterator."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import base_plus_ext, tar_file_iterator
    storage.register_webdataset_opener()
    return gopen, base_plus_ext, tar_file_iterator


@dataclass
class Lost:
    """Samples lost to an unreadable or truncated shard."""
    reason: str
    count: int
    shard: str
    error: str                             # what the reader raised


def iter_raw(shard: Shard, skip: int = 0) -> Iterator[Union[RawSample, Lost]]:
    """Raw samples of one shard after the first `skip`; a `Lost` item last when the tar is broken."""
    n = 0
    try:
        for raw in read_shard(shard.url):
            n += 1
            if n > skip:
                yield raw
    except Exception as e:                             # unreadable or truncated tar
        reason = "truncated_shard" if n else "unreadable_shard"
        missing = max(1, shard.samples - n) if shard.samples is not None else 1
        error = f"{type(e).__name__}: {str(e)[:300]}"
        log.warning("%s: %s after %d samples (%s); skipping the rest of it", shard.url, reason, n, error)
        yield Lost(reason, missing, shard.name, error)


class _TailReader:
    """A file wrapper that remembers the last bytes read, to tell a whole tar from a truncated one.

    Python's streaming tar reader takes a file cut exactly between two members for a complete
    archive; a complete tar ends with the end-of-archive marker (two zero blocks, then padding).
    """

    TAIL = 1024

    def __init__(self, f: Any):
        self._f, self._tail = f, b""

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._tail = (self._tail + data)[-self.TAIL:]
        return data

    def check_end(self) -> None:
        while self.read(1 << 16):              # drain the padding after the marker
            pass
        if self._tail != bytes(self.TAIL):
            raise tarfile.ReadError("the tar ends without its end-of-archive marker: truncated")

    def close(self) -> None:
        self._f.close()
