"""A payload written but never recorded (a submission that crashed between the two) is
swept by the reaper of a real process, in the payload store this run tests
(``OFA_TEST_PAYLOAD_STORE``), while a payload whose job is unfinished stays.

The sweeping process is a coordinator of this test's own (its own key prefix, so its
own reaper turn and job records; its own folder, bucket prefix or key prefix in the
payload store), started after the payloads are written and aged: a process sweeps on
its first reaper pass. Aged as the store tells age: a file's mtime set back, a Redis
payload's TTL shortened. An object's age is its Last-Modified, which no test can set
back: there the sweeping process runs with a blob lifetime of a few seconds, and the
orphan goes as any payload past the blob lifetime does.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest
import redis

from shared import wiring
from shared.keys import Keys, payload_name
from shared.payloads import digest_of
from shared.settings import Settings
from tests.conftest import payload_store_kind
from tests.helpers import MODEL, WorkerProcess, small_jpeg
from worker.reaper import ORPHAN_GRACE_S

SWEEP_PREFIX = "ofa:sweep:"
BLOB_TTL_S = 3600  # the blob lifetime the sweeping process has, except on an object store
OBJECT_BLOB_TTL_S = 3  # ... where age cannot be faked: see the module's docstring

pytestmark = pytest.mark.slow


def sweep_env(service_env: dict[str, str], tmp: Path) -> dict[str, str]:
    """The sweeping coordinator's environment: the run's payload store, in a place of
    this test's own."""
    env = {
        **service_env,
        "OFA_KEY_PREFIX": SWEEP_PREFIX,
        "OFA_MODEL_REVISION": "sweep",
        "OFA_BLOB_TTL_S": str(BLOB_TTL_S),
    }
    kind = payload_store_kind()
    if kind == "local":
        env["OFA_PAYLOAD_DIR"] = str(tmp / "payloads")
    elif kind == "s3":
        env["OFA_PAYLOAD_STORE"] = env["OFA_PAYLOAD_STORE"].rstrip("/") + "-sweep"
        env["OFA_BLOB_TTL_S"] = str(OBJECT_BLOB_TTL_S)
    return env  # redis: the key prefix already sets its payloads apart


def age(store: object, name: str, seconds: float) -> None:
    """Make a payload look ``seconds`` old to its store's sweep."""
    kind = payload_store_kind()
    if kind == "local":
        path = store.path(name)  # type: ignore[attr-defined]
        then = time.time() - seconds
        os.utime(path, (then, then))
    elif kind == "redis":
        client = store.clients[store.node(name)]  # type: ignore[attr-defined]
        left_ms = int((store.ttl_s - seconds) * 1000)  # type: ignore[attr-defined]
        assert client.pexpire(store.key(name), left_ms)  # type: ignore[attr-defined]


def test_a_payload_never_recorded_is_swept(
    service_env: dict[str, str], rdb: redis.Redis, tmp_path: Path
) -> None:
    env = sweep_env(service_env, tmp_path)
    ofa = {k.removeprefix("OFA_").lower(): v for k, v in env.items() if k.startswith("OFA_")}
    settings = Settings(_env_file=None, **ofa)  # type: ignore[arg-type]
    store = wiring.payload_store(settings)
    keys = Keys(SWEEP_PREFIX)
    kind = payload_store_kind()
    image = small_jpeg(seed=4242)
    key = digest_of(image + b"sweep")  # any verdict key: nothing checks it here
    orphan = payload_name(key, uuid.uuid4().hex)  # no record names its job
    live_id = uuid.uuid4().hex
    live = payload_name(key, live_id)  # its job is queued
    fresh = payload_name(key, uuid.uuid4().hex)  # no record yet, but written just now
    rdb.hset(keys.job(live_id), mapping={"status": "queued", "key": key})
    coordinator = None
    try:
        for name in (orphan, live, fresh):
            store.put(name, image)
        old = ORPHAN_GRACE_S + 60  # past the grace, well within the blob lifetime
        for name in (orphan, live):
            age(store, name, old)
        if kind == "s3":
            time.sleep(OBJECT_BLOB_TTL_S + 1)
        coordinator = WorkerProcess(
            env, rdb, tmp_path, command="coordinator", model=(MODEL[0], "sweep")
        )
        coordinator.start()
        started = time.monotonic()
        deadline = started + 30
        while store.get(orphan) is not None:
            assert time.monotonic() < deadline, "the orphaned payload was never swept"
            time.sleep(0.2)
        if kind != "s3":  # there everything is past the (short) blob lifetime
            assert store.get(live) == image  # its job is unfinished
            assert store.get(fresh) == image  # a submission may still be on its way
        print(f"{kind}: swept {time.monotonic() - started:.1f} s after the process was ready")
    finally:
        if coordinator is not None:
            coordinator.stop()
        for name in (orphan, live, fresh):
            store.delete(name)
        rdb.delete(keys.job(live_id))
        store.close()
