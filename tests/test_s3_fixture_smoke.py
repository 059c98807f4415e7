import fsspec


def test_s3_roundtrip_through_fsspec(s3_server):
    fs = fsspec.filesystem("s3")
    fs.invalidate_cache()
    with fsspec.open("s3://test-bucket/hello.txt", "wb") as f:
        f.write(b"hi")
    with fsspec.open("s3://test-bucket/hello.txt", "rb") as f:
        assert f.read() == b"hi"
