"""fsspec URLs for every stage: open, list, join, and atomic publication of directories.

Every path in the pipeline is a URL: a local path, ``file://``, ``s3://``, ``gs://``, ``memory://``.
Publication is atomic for readers: files are written first, then a ``COMPLETE`` marker last; a
directory without the marker does not exist for any reader (``is_complete``).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import fsspec
from fsspec.core import url_to_fs

from pipeline.layout import COMPLETE

BUCKET_STORES = ("s3", "s3a", "gs", "gcs")
CREATE_BUCKETS = "CONTRAST_CREATE_BUCKETS"   # =1: a missing bucket is created instead of refused
F = TypeVar("F", bound=Callable[..., Any])


class StorageError(PermissionError):
    """Storage that cannot be used as asked: the message names the URL, the status and what to check."""


def named_errors(fn: F) -> F:
    """Access refused by the store becomes one StorageError naming the URL (the first argument), the
    status and what to check, instead of the store client's bare message."""
    @functools.wraps(fn)
    def wrapper(url: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(url, *args, **kwargs)
        except StorageError:
            raise
        except PermissionError as e:
            raise StorageError(f"{url}: access denied ({_status(e)}): check the credentials (AWS_ACCESS_KEY_ID / "
                               "AWS_PROFILE or the cloud's login), the endpoint (AWS_ENDPOINT_URL) and the "
                               "bucket's policy") from None
    return wrapper  # type: ignore[return-value]


class OutOfSpace(OSError):
    """A local disk without room for what must be written: the message names the path and the sizes."""


def require_space(path: str | Path, needed: int) -> None:
    """Refuse before writing `needed` bytes under the local `path` when its disk has less free."""
    free = _free_bytes(path)
    if free < needed:
        raise OutOfSpace(f"{path}: needs about {_gb(needed)} but its disk has {_gb(free)} free; free some space "
                         "or point this at another disk (TMPDIR for temporary files)")


@contextlib.contextmanager
def space_named(path: str | Path, needed: int) -> Iterator[None]:
    """A write that fills the disk anyway fails with OutOfSpace naming the path and the size needed."""
    try:
        yield
    except OSError as e:
        if e.errno != errno.ENOSPC or isinstance(e, OutOfSpace):
            raise
        raise OutOfSpace(f"{path}: no space left on the device while writing about {_gb(needed)} "
                         f"({_gb(_free_bytes(path))} free now)") from None


def _free_bytes(path: str | Path) -> int:
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return shutil.disk_usage(existing).free


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def _status(error: BaseException) -> str:
    """The HTTP status and the store's message, from the client error under fsspec's PermissionError."""
    cause = error.__cause__ or error.__context__
    response = getattr(cause, "response", None) or {}
    code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    message = str(error).strip() or type(error).__name__
    return f"HTTP {code}: {message}" if code else message


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


@named_errors
def exists(url: str) -> bool:
    fs, path = fresh(url)
    return fs.exists(path)


@named_errors
def open_url(url: str, mode: str = "rb", **kwargs: Any):
    """Open a URL for reading or writing (parent folders are created for local writes)."""
    if "w" in mode and is_local(url):
        Path(local_path(url)).parent.mkdir(parents=True, exist_ok=True)
    return fsspec.open(str(url), mode, **kwargs).open()


@named_errors
def read_bytes(url: str) -> bytes:
    with open_url(url, "rb") as f:
        return f.read()


@named_errors
def read_json(url: str) -> Any:
    with open_url(url, "r", encoding="utf-8") as f:
        return json.load(f)


@named_errors
def write_bytes(url: str, data: bytes) -> None:
    """Write a file so that a reader sees either nothing or all of it.

    Local files go through a temporary name and one rename; object stores publish an object only
    when its upload completes, which is already atomic.
    """
    if is_local(url):
        path = Path(local_path(url))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with space_named(path, len(data)), open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
    else:
        fs, path = filesystem(url)
        fs.pipe_file(path, data)


@named_errors
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


@named_errors
def write_json(url: str, obj: Any) -> None:
    write_bytes(url, json.dumps(obj, indent=2, sort_keys=True).encode("utf-8"))


@named_errors
def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly inside a folder URL; empty when it does not exist."""
    fs, path = fresh(url)
    if not fs.exists(path):
        return []
    return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


@named_errors
def makedirs(url: str) -> None:
    """Make a folder; on an object store (no folders) check that the bucket exists instead, refusing
    to create one unless CONTRAST_CREATE_BUCKETS=1 (a typo in its name would make a new bucket)."""
    fs, path = filesystem(url)
    if protocol(url) not in BUCKET_STORES:
        fs.makedirs(path, exist_ok=True)
        return
    bucket = path.split("/", 1)[0]
    if fs.exists(bucket):
        return
    if os.environ.get(CREATE_BUCKETS) != "1":
        raise StorageError(f"{url}: bucket {bucket!r} does not exist (a typo?); create it first, or set "
                           f"{CREATE_BUCKETS}=1 to have contrast create it")
    fs.mkdir(bucket)


@named_errors
def remove(url: str) -> None:
    """Remove a file or a folder tree; missing is fine."""
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@named_errors
def upload_dir(local_dir: str | Path, url: str) -> None:
    """Copy a local folder tree to a URL (files only; the marker is the caller's business)."""
    local_dir = Path(local_dir)
    files = sorted(p for p in local_dir.rglob("*") if p.is_file())
    if is_local(url):
        size = sum(f.stat().st_size for f in files)
        require_space(local_path(url), size)
    for file in files:
        rel = file.relative_to(local_dir).as_posix()
        if is_local(url):
            dest = Path(local_path(url)) / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with space_named(dest, file.stat().st_size), open(file, "rb") as src, open(dest, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
        else:
            fs, path = filesystem(url)
            fs.put_file(str(file), posixpath.join(path, rel))


@named_errors
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


@named_errors
def is_complete(url: str) -> bool:
    return exists(join(url, COMPLETE))


def complete_subdirs(url: str, prefix: str = "step_") -> list[str]:
    """Names of the published sub-folders of `url` (those with a COMPLETE marker), sorted."""
    return [name for name in listdir(url) if name.startswith(prefix) and is_complete(join(url, name))]


@named_errors
def iter_files(url: str, suffix: str = "") -> list[str]:
    """URLs of the files directly inside a folder URL whose names end with `suffix`, sorted."""
    fs, path = fresh(url)
    if not fs.exists(path):
        return []
    return [with_protocol(fs, p) for p in sorted(fs.ls(path, detail=False)) if p.endswith(suffix) and fs.isfile(p)]


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
