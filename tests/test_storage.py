"""Storage errors a user can act on: a bucket typo, refused credentials, a full disk."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pipeline import storage
from pipeline.data import ShardWriter
from tests.helpers.net import free_port


def test_a_missing_bucket_is_refused_not_created(s3_server, monkeypatch):
    import boto3
    with pytest.raises(storage.StorageError, match="bucket 'test-bucekt' does not exist .*CONTRAST_CREATE_BUCKETS"):
        ShardWriter("s3://test-bucekt/shards")
    names = {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}
    assert "test-bucekt" not in names
    monkeypatch.setenv(storage.CREATE_BUCKETS, "1")                   # asked for: created
    ShardWriter("s3://made-on-purpose/shards")
    assert "made-on-purpose" in {b["Name"] for b in boto3.client("s3").list_buckets()["Buckets"]}


def test_refused_credentials_name_the_url_and_the_status(tmp_path):
    """A store that checks credentials (moto with authentication on), reached with unknown keys."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "moto_server"), "-H", "127.0.0.1",
                               "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(2)
        code = ("from pipeline import storage\n"
                "try:\n    storage.listdir('s3://some-bucket/run/checkpoints')\n"
                "except storage.StorageError as e:\n    print('ERR', e)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                                  "AWS_ACCESS_KEY_ID": "nobody", "AWS_SECRET_ACCESS_KEY": "wrong"}).stdout
        assert "ERR s3://some-bucket/run/checkpoints: access denied (HTTP 403" in out, out
        assert "check the credentials" in out and "wrong" not in out
    finally:
        server.kill()


def test_too_little_space_names_the_path_and_the_size(tmp_path):
    with pytest.raises(storage.OutOfSpace, match=f"{tmp_path}/deep/x: needs about 8388608.00 GiB"):
        storage.require_space(tmp_path / "deep" / "x", 2**53)


def test_a_disk_that_fills_up_names_the_path_and_the_size(tmp_path):
    """A real 1 MiB filesystem (tmpfs; needs the right to mount, else skipped) and a 3 MiB upload."""
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        src = tmp_path / "src"
        src.mkdir()
        (src / "weights.bin").write_bytes(os.urandom(3 * 2**20))
        with pytest.raises(storage.OutOfSpace, match=f"{small}/run: needs about 3.0 MiB but its disk has"):
            storage.upload_dir(src, str(small / "run"))
        with pytest.raises(storage.OutOfSpace, match="no space left on the device while writing about 3.0 MiB"):
            storage.write_bytes(str(small / "x.bin"), os.urandom(3 * 2**20))
        assert not any(p.name.startswith(".x.bin.tmp") for p in small.iterdir())     # no half-written file left
    finally:
        subprocess.run(["umount", str(small)], check=False)
