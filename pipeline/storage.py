"""fsspec URLs for every stage: open, list, join, and atomic publication of directories.

Every path in the pipeline is a URL: a local path, ``file://``, ``s3://``, ``gs://``, ``memory://``.
Publication is atomic for readers: files are written first, then a ``COMPLETE`` marker last; a
directory without the marker does not exist for any reader (``is_complete``).
"""
from __future__ import annotations

import contextlib
import json
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any, Iterator

import fsspec
from fsspec.core import url_to_fs

from pipeline.layout import COMPLETE


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem behind a URL and the path inside it."""
    return url_to_fs(str(url))


def protocol(url: str) -> str:
    url = str(url)
    return url.split("://", 1)[0] if "://" in url else "file"


def is_local(url: str) -> bool:
    return protocol(url) in ("file", "local")


def local_path(url: str) -> str:
    """The OS path of a local URL (``file://x`` or ``x``)."""
    url = str(url)
    return url[len("file://"):] if url.startswith("file://") else url


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the protocol (``s3://b/run`` + ``eval`` → ``s3://b/run/eval``)."""
    base = str(base)
    if is_local(base) and "://" not in base:
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a path returned by `fs.ls`/`fs.glob` back into a URL for the same filesystem."""
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if proto in ("file", "local"):
        return path
    return path if "://" in path else f"{proto}://{path}"


def fresh(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Like `filesystem`, with the listing cache for the path and its parents dropped: pollers
    (the eval watcher, claims) must see what other processes wrote since (s3fs caches listings)."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    return fs, path


def exists(url: str) -> bool:
    fs, path = fresh(url)
    return fs.exists(path)


def open_url(url: str, mode: str = "rb", **kwargs: Any):
    """Open a URL for reading or writing (parent folders are created for local writes)."""
    if "w" in mode and is_local(url):
        Path(local_path(url)).parent.mkdir(parents=True, exist_ok=True)
    return fsspec.open(str(url), mode, **kwargs).open()


def read_bytes(url: str) -> bytes:
    with open_url(url, "rb") as f:
        return f.read()


def read_json(url: str) -> Any:
    with open_url(url, "r", encoding="utf-8") as f:
        return json.load(f)


def write_bytes(url: str, data: bytes) -> None:
    """Write a file so that a reader sees either nothing or all of it.

    Local files go through a temporary name and one rename; object stores publish an object only
    when its upload completes, which is already atomic.
    """
    if is_local(url):
        path = Path(local_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs, path = filesystem(url)
        fs.pipe_file(path, data)


def create_exclusive(url: str, data: bytes) -> bool:
    """Create a file only if it does not exist yet; True when this call created it.

    Atomic against concurrent creators on local/NFS filesystems (a fully written temporary file is
    hard-linked to the name, which fails if the name exists), on S3 (a conditional PUT with
    ``If-None-Match: *``) and in ``memory://``. Other filesystems fall back to check-then-write,
    which two racing writers can both pass: do not rely on it for mutual exclusion there.
    """
    if is_local(url):
        path = Path(local_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()
    fs, path = filesystem(url)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False


def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly inside a folder URL; empty when it does not exist."""
    fs, path = fresh(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def remove(url: str) -> None:
    """Remove a file or a folder tree; missing is fine."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def upload_dir(local_dir: str | Path, url: str) -> None:
    """Copy a local folder tree to a URL (files only; the marker is the caller's business)."""
    local_dir = Path(local_dir)
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        if is_local(url):
            dest = Path(local_path(url)) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(file, "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        else:
            fs, path = filesystem(url)
            fs.put_file(str(file), posixpath.join(path, rel))


def download_dir(url: str, local_dir: str | Path) -> None:
    """Copy a folder URL tree into a local folder."""
    fs, root = filesystem(url)
    local_dir = Path(local_dir)
    for path in fs.find(root):
        rel = posixpath.relpath(path, root)
        dest = local_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(dest))


@contextlib.contextmanager
def staged_dir(url: str) -> Iterator[Path]:
    """A local folder to write `url`'s files into: the folder itself when local, else a temporary
    one uploaded to `url` on a clean exit (for writers that only know local paths)."""
    if is_local(url):
        path = Path(local_path(url))
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="staged-") as tmp:
        yield Path(tmp)
        upload_dir(tmp, url)


@contextlib.contextmanager
def local_copy(url: str) -> Iterator[Path]:
    """A local folder holding `url`'s files: the folder itself when local, else a temporary download
    (empty when `url` does not exist)."""
    if is_local(url):
        yield Path(local_path(url))
        return
    with tempfile.TemporaryDirectory(prefix="copy-") as tmp:
        if exists(url):
            download_dir(url, tmp)
        yield Path(tmp)


def publish_dir(local_dir: str | Path, url: str, marker: dict[str, Any] | None = None) -> None:
    """Upload a folder, then write its COMPLETE marker last: readers see all of it or none of it."""
    remove(join(url, COMPLETE))
    upload_dir(local_dir, url)
    write_json(join(url, COMPLETE), marker or {})


def is_complete(url: str) -> bool:
    return exists(join(url, COMPLETE))


def complete_subdirs(url: str, prefix: str = "step_") -> list[str]:
    """Names of the published sub-folders of `url` (those with a COMPLETE marker), sorted."""
    return [name for name in listdir(url) if name.startswith(prefix) and is_complete(join(url, name))]


def iter_files(url: str, suffix: str = "") -> Iterator[str]:
    """URLs of the files directly inside a folder URL whose names end with `suffix`, sorted."""
    fs, path = fresh(url)
    if not fs.exists(path):
        return
    for p in sorted(fs.ls(path, detail=False)):
        if p.endswith(suffix) and fs.isfile(p):
            yield with_protocol(fs, p)


def register_webdataset_opener() -> None:
    """Make webdataset open every fsspec protocol (s3, gs, http(s), memory, …) through fsspec.

    webdataset 1.0 has its own URL table (`webdataset.gopen.gopen_schemes`) without ``s3://`` and
    with ``http(s)`` going through curl; we point every fsspec protocol at fsspec instead. Local
    paths and ``pipe:`` keep webdataset's handlers (the data stage refuses ``pipe:`` unless allowed).
    """
    import sys

    import webdataset  # noqa: F401  (imports webdataset.gopen)
    schemes = sys.modules["webdataset.gopen"].gopen_schemes
    if schemes.get("s3") is _gopen_fsspec:
        return
    for proto in fsspec.available_protocols():
        if proto not in ("file", "local", "pipe"):
            schemes[proto] = _gopen_fsspec


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, **kwargs: Any):
    return fsspec.open(url, mode).open()
