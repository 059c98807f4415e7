"""What a checkpoint's files must be: a manifest of sizes and sha256, written before `COMPLETE`, checked
before the checkpoint is used.

`COMPLETE` says that the writer finished; it cannot say that the files are still what was written (a
disk that filled up, a copy that stopped half-way, a file deleted by hand, a bit flipped in a bucket).
Every file of a resume checkpoint is listed in its `manifest.json` with its size and sha256, so a reader
names what is wrong (missing, truncated, changed, unreadable JSON) instead of failing deep inside
DeepSpeed or `torch.load` with a raw traceback.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.layout import COMPLETE, MANIFEST

MANIFEST_VERSION = 1
CHUNK = 1 << 22


class DamagedCheckpoint(RuntimeError):
    """No usable resume checkpoint: every complete one is damaged; the message names each and what is wrong."""


def digest(data: bytes) -> dict[str, Any]:
    """A file's manifest entry: its size and sha256."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digests(local_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Manifest entries of every file under a local folder, by relative POSIX path (read in chunks)."""
    out = {}
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                size += len(chunk)
        out[path.relative_to(root).as_posix()] = {"bytes": size, "sha256": h.hexdigest()}
    return out


def manifest(step: int, files: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "step": step, "files": dict(sorted(files.items()))}


def problems(url: str, hashes: bool = True, listing: str = MANIFEST) -> list[str]:
    """What is wrong with the checkpoint folder at `url` (empty: nothing). Each entry names a file.

    Checks every file that its manifest (the JSON file `listing`, whose "files" are `manifest()`'s) lists:
    present, its size, with `hashes` its sha256, and that the JSON files parse. A checkpoint written
    before manifests existed has none: its JSON files are checked and its other files for being non-empty.
    """
    sizes = _sizes(url)
    if listing not in sizes:
        return _legacy_problems(url, sizes)
    try:
        listed = storage.read_json(storage.join(url, listing))["files"]
    except (ValueError, KeyError, TypeError) as e:
        return [f"{listing}: unreadable ({type(e).__name__}: {e})"]
    found = []
    for rel, want in listed.items():
        found += _file_problems(url, rel, want, sizes.get(rel), hashes)
    return found


def _file_problems(url: str, rel: str, want: dict[str, Any], size: int | None, hashes: bool) -> list[str]:
    if size is None:
        return [f"{rel}: missing"]
    if size != want["bytes"]:
        how = "truncated" if size < want["bytes"] else "grown"
        return [f"{rel}: {size} bytes, the manifest says {want['bytes']} ({how})"]
    if hashes and _sha256(storage.join(url, rel)) != want["sha256"]:
        return [f"{rel}: its sha256 differs from the manifest's (the file was changed after it was written)"]
    if rel.endswith(".json") and "/" not in rel:
        return _json_problems(url, rel)
    return []


def _legacy_problems(url: str, sizes: dict[str, int]) -> list[str]:
    found = [p for rel in ("meta.json", "data_state.json") for p in (_json_problems(url, rel) if rel in sizes
                                                                       else [f"{rel}: missing"])]
    return found + [f"{rel}: empty" for rel, size in sizes.items() if size == 0 and rel != COMPLETE]


def _json_problems(url: str, rel: str) -> list[str]:
    try:
        storage.read_json(storage.join(url, rel))
        return []
    except ValueError as e:
        return [f"{rel}: not valid JSON ({e})"]


def _sizes(url: str) -> dict[str, int]:
    """Size of every file under a folder URL, by relative POSIX path (one listing)."""
    fs, root = storage.fresh(url)
    if not fs.exists(root):
        return {}
    root = root.rstrip("/")
    return {posixpath.relpath(path, root): int(info.get("size") or 0)
            for path, info in fs.find(root, detail=True).items() if info.get("type", "file") == "file"}


def _sha256(url: str) -> str:
    h = hashlib.sha256()
    with storage.open_url(url, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def dumps(obj: Any) -> bytes:
    """JSON bytes as `storage.write_json` writes them, so that their digest is the file's."""
    return json.dumps(obj, indent=2, sort_keys=True).encode("utf-8")
