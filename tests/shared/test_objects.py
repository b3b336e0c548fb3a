"""shared/objects.py: object URLs, the bucket allow-list, and reads and writes against a
real S3-compatible server (moto's standalone server, tests/objstore.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator

import pytest

from shared.objects import (
    BucketPolicy,
    ObjectNotFound,
    ObjectStorage,
    ObjectStoreUnavailable,
    ObjectTooLarge,
    ObjectUrl,
    bounded,
    is_object_url,
)
from shared.settings import Settings
from tests.helpers import free_port
from tests.objstore import AWS_ENV, MotoServer

# --- URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parts"),
    [
        ("s3://bucket/key.jsonl", ("s3", "bucket", "key.jsonl")),
        ("s3://my.bucket-1/a/b/c.jpg", ("s3", "my.bucket-1", "a/b/c.jpg")),
        ("gs://gcs_bucket/x y/z%20.png", ("gs", "gcs_bucket", "x y/z%20.png")),
        ("az://container-1/deep/key", ("az", "container-1", "deep/key")),
    ],
)
def test_object_urls_parse_into_scheme_bucket_and_literal_key(url, parts):
    parsed = ObjectUrl.parse(url)
    assert (parsed.scheme, parsed.bucket, parsed.key) == parts
    assert str(parsed) == url
    assert is_object_url(url)


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("s3:///key", "no bucket"),
        ("s3://bucket", "no object key"),
        ("s3://bucket/", "no object key"),
        ("s3://Bad_Bucket/key", "bad bucket name"),
        ("s3://ab/key", "bad bucket name"),
        ("s3://bu..cket/key", "bad bucket name"),
        ("az://two--hyphens/key", "bad bucket name"),
        ("s3://bucket/a//b", "path segment"),
        ("s3://bucket/a/../b", "path segment"),
        ("s3://bucket/./b", "path segment"),
        ("s3://bucket/a\nb", "control characters"),
        ("s3://bucket/" + "k" * 1025, "longer than 1024"),
        ("https://example.com/key", "not an object URL"),
        ("S3://bucket/key", "not an object URL"),
        ("/local/path", "not an object URL"),
    ],
)
def test_malformed_object_urls_are_refused_with_a_reason(url, says):
    with pytest.raises(ValueError, match=says):
        ObjectUrl.parse(url)


def test_prefix_urls_may_name_a_bucket_or_a_prefix():
    assert ObjectUrl.parse("s3://bucket", key_required=False) == ObjectUrl("s3", "bucket")
    assert ObjectUrl.parse("s3://bucket/p/q/", key_required=False).key == "p/q"
    assert ObjectUrl.parse("s3://bucket/p", key_required=False).child("d") == ObjectUrl(
        "s3", "bucket", "p/d"
    )
    assert not is_object_url("http://bucket/key") and not is_object_url("bucket/key")
    assert not is_object_url("S3://bucket/key")  # as parse: schemes are lowercase


# --- the allow-list ------------------------------------------------------------------


def test_buckets_match_by_whole_name_never_by_string_prefix():
    policy = BucketPolicy(["s3://shop"])
    assert policy.allows("s3://shop/a.jpg")
    assert policy.allows("s3://shop/deep/a.jpg")
    assert not policy.allows("s3://shop-eu/a.jpg")
    assert not policy.allows("s3://sho/a.jpg")
    assert not policy.allows("gs://shop/a.jpg")  # same name, another cloud


def test_prefixes_match_on_path_segments():
    policy = BucketPolicy(["s3://shop/tenant-a/", "gs://media/public"])
    assert policy.allows("s3://shop/tenant-a/x.jpg")
    assert policy.allows("s3://shop/tenant-a/sub/x.jpg")
    assert not policy.allows("s3://shop/tenant-ab/x.jpg")
    assert not policy.allows("s3://shop/tenant-b/x.jpg")
    assert not policy.allows("s3://shop/x.jpg")
    assert policy.allows("gs://media/public/a.png")
    assert not policy.allows("gs://media/publicity/a.png")


def test_a_keys_list_narrows_the_global_list():
    policy = BucketPolicy(["s3://shop", "s3://shop-eu", "gs://media/public/"])
    assert policy.allows("s3://shop-eu/a.jpg", None)
    assert policy.allows("s3://shop/t1/a.jpg", ["s3://shop/t1/"])
    assert not policy.allows("s3://shop/t2/a.jpg", ["s3://shop/t1/"])
    assert not policy.allows("s3://shop-eu/a.jpg", ["s3://shop"])
    # A key may not widen what the service allows.
    assert not policy.allows("s3://other/a.jpg", ["s3://other"])
    assert not policy.allows("gs://media/private/a.png", ["gs://media"])
    assert not policy.allows("s3://shop/a.jpg", [])


def test_nothing_is_allowed_by_default_and_malformed_urls_never():
    assert not BucketPolicy([]).allows("s3://shop/a.jpg")
    assert not BucketPolicy(Settings().object_buckets).allows("s3://shop/a.jpg")
    policy = BucketPolicy(["s3://shop"])
    assert not policy.allows("s3://shop/../shop-eu/a.jpg")
    assert not policy.allows("https://shop/a.jpg")
    with pytest.raises(ValueError, match="OFA_OBJECT_BUCKETS"):
        BucketPolicy(["s3://Not_A_Bucket"])
    with pytest.raises(ValueError, match="the key's bucket list"):
        policy.allows("s3://shop/a.jpg", ["https://shop"])


def test_settings_read_the_allow_list_and_the_s3_endpoint(monkeypatch):
    monkeypatch.setenv("OFA_OBJECT_BUCKETS", "s3://shop, gs://media/public/ ,")
    monkeypatch.setenv("OFA_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("OFA_S3_ALLOW_HTTP", "true")
    settings = Settings()
    assert settings.object_buckets == ["s3://shop", "gs://media/public/"]
    storage = ObjectStorage.from_settings(settings)
    assert storage.s3_endpoint_url == "http://127.0.0.1:9000" and storage.s3_allow_http


# --- against the S3-compatible server ------------------------------------------------


@pytest.fixture
def s3(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ObjectStorage, str]]:
    """A client on moto with credentials from the environment, and a new bucket."""
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    bucket = f"b-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    yield ObjectStorage(s3_endpoint_url=moto.endpoint, s3_allow_http=True, timeout_s=5), bucket


def test_head_and_a_conditional_read_revalidate_by_etag(s3):
    storage, bucket = s3
    url = f"s3://{bucket}/images/a.jpg"
    etag = storage.put(url, b"first version")
    meta = storage.head(url)
    assert meta.size == len(b"first version") and meta.etag == etag and meta.etag
    assert meta.last_modified.tzinfo is not None

    data, tag = storage.read_bytes(url, max_bytes=1024)
    assert data == b"first version" and tag == etag
    assert storage.read_bytes(url, max_bytes=1024, if_none_match=tag) == (None, tag)

    storage.put(url, b"second version")
    data, new_tag = storage.read_bytes(url, max_bytes=1024, if_none_match=tag)
    assert data == b"second version" and new_tag != tag
    with pytest.raises(ObjectTooLarge, match=f"s3://{bucket}/images/a.jpg"):
        storage.read_bytes(url, max_bytes=10)


def test_a_missing_object_or_bucket_is_not_found(s3):
    storage, bucket = s3
    for url in (f"s3://{bucket}/nothing-here", "s3://no-such-bucket-anywhere/key"):
        for call in (
            lambda u: storage.head(u),
            lambda u: storage.read_bytes(u, 10),
            lambda u: storage.read_stream(u, 10),
            lambda u: storage.get(u),
        ):
            with pytest.raises(ObjectNotFound, match=url):
                call(url)
    storage.delete(f"s3://{bucket}/nothing-here")  # deleting what is gone is fine


def test_a_stream_stops_within_one_chunk_past_its_limit(s3):
    storage, bucket = s3
    url = f"s3://{bucket}/big.bin"
    body = os.urandom(3 * 1024 * 1024)
    storage.put(url, body)

    # Declared longer than the limit: refused before any byte is read.
    with pytest.raises(ObjectTooLarge):
        storage.read_stream(url, max_bytes=1024 * 1024)

    # Counted as it arrives: the consumer never gets more than the limit, and what was
    # read from the network is at most the limit plus the chunk that crossed it.
    limit = 1024 * 1024
    fetched: list[int] = []

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            fetched.append(len(chunk))
            yield chunk

    got = 0
    stream = storage.read_stream(url, max_bytes=len(body), chunk_bytes=64 * 1024)
    with pytest.raises(ObjectTooLarge, match="larger than 1048576 bytes"):
        for chunk in bounded(counted(stream), url, limit):
            got += len(chunk)
    assert got <= limit
    assert sum(fetched) - max(fetched) <= limit < sum(fetched)


def test_a_stream_reads_everything_in_chunks_and_from_an_offset(s3):
    storage, bucket = s3
    url = f"s3://{bucket}/m.jsonl"
    body = b"".join(b'{"row": %d}\n' % i for i in range(50_000))
    storage.put(url, body)
    chunks = list(storage.read_stream(url, max_bytes=len(body), chunk_bytes=64 * 1024))
    assert b"".join(chunks) == body and len(chunks) > 1
    rest = b"".join(storage.read_stream(url, max_bytes=len(body), start=1000))
    assert rest == body[1000:]


def test_write_stream_uploads_a_multi_megabyte_object_in_parts(s3):
    storage, bucket = s3
    url = f"s3://{bucket}/results/scan.jsonl"
    parts = [os.urandom(1024 * 1024) for _ in range(20)]  # 20 MiB: three 8 MiB parts
    etag = storage.write_stream(url, iter(parts))
    meta = storage.head(url)
    assert meta.size == 20 * 1024 * 1024 and meta.etag == etag
    assert etag and etag.strip('"').endswith("-3")  # S3's mark of a 3-part upload
    read = b"".join(storage.read_stream(url, max_bytes=meta.size))
    assert read == b"".join(parts)


def test_a_failed_write_stream_leaves_no_object(s3):
    storage, bucket = s3
    url = f"s3://{bucket}/results/broken.jsonl"

    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            yield os.urandom(4 * 1024 * 1024)
        raise RuntimeError("the results file broke")

    with pytest.raises(RuntimeError, match="broke"):
        storage.write_stream(url, chunks())
    with pytest.raises(ObjectNotFound):
        storage.head(url)


def test_list_gives_every_object_under_a_prefix_with_its_age(s3):
    storage, bucket = s3
    for key in ("p/a", "p/b", "p/sub/c", "pq/d", "other"):
        storage.put(f"s3://{bucket}/{key}", key.encode())
    listed = {m.url.key: m for m in storage.list(f"s3://{bucket}/p/")}
    assert set(listed) == {"p/a", "p/b", "p/sub/c"}
    assert listed["p/sub/c"].size == len(b"p/sub/c")
    assert listed["p/a"].url == ObjectUrl("s3", bucket, "p/a")
    assert all(time.time() - m.last_modified.timestamp() < 120 for m in listed.values())
    assert len(list(storage.list(f"s3://{bucket}"))) == 5
    storage.delete(f"s3://{bucket}/p/a")
    assert {m.url.key for m in storage.list(f"s3://{bucket}/p")} == {"p/b", "p/sub/c"}


def test_the_async_calls_read_as_the_blocking_ones(s3):
    storage, bucket = s3
    url = f"s3://{bucket}/async.bin"
    etag = storage.put(url, b"x" * 5000)

    async def main() -> None:
        assert (await storage.ahead(url)).size == 5000
        assert await storage.aread_bytes(url, 5000) == (b"x" * 5000, etag)
        assert await storage.aread_bytes(url, 5000, if_none_match=etag) == (None, etag)
        with pytest.raises(ObjectTooLarge):
            await storage.aread_bytes(url, 4999)
        assert b"".join([c async for c in storage.aread_stream(url, 5000, start=10)]) == (
            b"x" * 4990
        )
        await storage.adelete(url)
        with pytest.raises(ObjectNotFound):
            await storage.ahead(url)

    asyncio.run(main())


def test_one_store_per_bucket(s3):
    storage, bucket = s3
    a = storage.store(ObjectUrl("s3", bucket, "x"))
    assert storage.store(ObjectUrl("s3", bucket, "y")) is a
    assert storage.store(ObjectUrl("s3", "another-bucket", "y")) is not a


# --- an unreachable store ------------------------------------------------------------


def test_a_refused_endpoint_is_unavailable_within_seconds(monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    storage = ObjectStorage(
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}", s3_allow_http=True, timeout_s=2
    )
    started = time.monotonic()
    with pytest.raises(ObjectStoreUnavailable, match="s3://bucket/key") as caught:
        storage.head("s3://bucket/key")
    assert time.monotonic() - started < 5
    assert "testing" not in str(caught.value)  # no credentials in the message
    with pytest.raises(ObjectStoreUnavailable):
        storage.write_stream("s3://bucket/key", [b"x" * 100])


def test_an_endpoint_that_never_answers_is_unavailable_after_the_timeout(monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    with socket.socket() as hole:  # accepts connections (the backlog), never answers
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)
        port = hole.getsockname()[1]
        storage = ObjectStorage(
            s3_endpoint_url=f"http://127.0.0.1:{port}", s3_allow_http=True, timeout_s=1
        )
        started = time.monotonic()
        with pytest.raises(ObjectStoreUnavailable):
            storage.read_bytes("s3://bucket/key", 1024)
        assert time.monotonic() - started < 5
