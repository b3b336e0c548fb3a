"""Service sub-commands of ``ofa-entail``: up, api, worker, flower, check."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shared.settings import Settings, get_settings

logger = logging.getLogger("ofa_entail")

SECRETS_FILE = "secrets.env"


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blanks skipped)."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                out[k.strip()] = v.strip()
    return out


def ensure_secrets(settings: Settings) -> dict[str, str]:
    """API key and Flower password: from the environment, else generated once into
    ``data_dir/secrets.env`` (mode 600) and reused on later runs."""
    path = settings.data_dir / SECRETS_FILE
    stored = read_env_file(path)
    wanted = {
        "OFA_API_KEYS": os.environ.get("OFA_API_KEYS") or stored.get("OFA_API_KEYS"),
        "OFA_FLOWER_PASSWORD": os.environ.get("OFA_FLOWER_PASSWORD")
        or stored.get("OFA_FLOWER_PASSWORD"),
        "OFA_WEBHOOK_SECRET": os.environ.get("OFA_WEBHOOK_SECRET")
        or stored.get("OFA_WEBHOOK_SECRET"),
    }
    generated = False
    for name, value in wanted.items():
        if not value:
            wanted[name] = secrets.token_urlsafe(32)
            generated = True
    values = {k: v for k, v in wanted.items() if v}
    if generated:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
        logger.info("generated an API key and a Flower password into %s", path)
    return values


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker holding the model (threads pool, one process per device)."""
    from shared.celery_app import queue_name

    settings = get_settings()
    from worker.app import app

    queues = [queue_name(*settings.model_tag), queue_name(*settings.model_tag, bulk=True)]
    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={args.concurrency or settings.worker_threads}",
        f"--queues={','.join(queues)}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
        f"--loglevel={'DEBUG' if args.verbose else 'INFO'}",
        f"--hostname={args.name or 'ofa'}@%h",
    ]
    if not args.verbose:
        # Two INFO lines per task add up at hundreds of jobs/s; Flower shows every task.
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(logging.WARNING)
    app.worker_main(argv)
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    """Run the scan coordinator (no GPU, no torch): a Celery worker on the scans queue."""
    from shared.celery_app import SCAN_QUEUE
    from worker.scan_app import app

    argv = [
        "worker",
        "--pool=threads",
        f"--concurrency={args.concurrency}",
        f"--queues={SCAN_QUEUE}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
        f"--loglevel={'DEBUG' if args.verbose else 'INFO'}",
        f"--hostname={args.name or 'coordinator'}@%h",
    ]
    app.worker_main(argv)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host or settings.api_host,
        port=args.port or settings.api_port,
        workers=args.workers,
        log_level="info",
        access_log=False,
    )
    return 0


def flower_argv(settings: Settings, password: str) -> list[str]:
    """The command line that starts Flower with basic auth."""
    return [
        sys.executable,
        "-m",
        "celery",
        "--app=shared.celery_app:app",
        "flower",
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        f"--basic-auth={settings.flower_user}:{password}",
        "--persistent=False",
    ]


def cmd_flower(_: argparse.Namespace) -> int:
    """Run Flower (monitoring UI and /metrics) with basic auth from settings."""
    settings = get_settings()
    if settings.flower_password is None:
        print(
            "error: set OFA_FLOWER_PASSWORD (Flower always runs with basic auth)", file=sys.stderr
        )
        return 2
    argv = flower_argv(settings, settings.flower_password.get_secret_value())
    return subprocess.call(argv)


def cmd_up(args: argparse.Namespace) -> int:
    """Everything on one machine: embedded Valkey (if no Redis set), worker, scan
    coordinator, API, Flower; children that exit are restarted."""
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(ensure_secrets(settings))
    server: Any = None
    if not settings.redis_url:
        from shared.embedded import start_embedded

        server = start_embedded(settings.data_dir.resolve())
        env["OFA_REDIS_URL"] = (settings.data_dir / "redis.url").read_text().strip()
    env["OFA_DATA_DIR"] = str(settings.data_dir.resolve())
    cli = [sys.executable, "-m", "shared.cli"]
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        commands = {
            "worker": [*cli, "worker"],
            "coordinator": [*cli, "coordinator"],
            "api": [*cli, "api"],
            "flower": flower_argv(settings, env["OFA_FLOWER_PASSWORD"]),
        }
        for name, command in commands.items():
            children[name] = subprocess.Popen(command, env=env)
        model_id, revision = settings.model_tag
        logger.info("Redis:  %s", env.get("OFA_REDIS_URL") or settings.redis_url)
        logger.info("API:    http://%s:%d  (docs at /docs)", settings.api_host, settings.api_port)
        logger.info(
            "Flower: http://%s:%d  (user %s, password in %s)",
            settings.flower_host,
            settings.flower_port,
            settings.flower_user,
            settings.data_dir / SECRETS_FILE,
        )
        logger.info("Model:  %s@%s from %s", model_id, revision, settings.model_ref)
        logger.info("API key in %s; press Ctrl-C to stop", settings.data_dir / SECRETS_FILE)
        # A child that exits is restarted (a worker stops after a broker restart, for
        # one); one that keeps exiting stops the whole service.
        restarts: dict[str, list[float]] = {name: [] for name in children}
        while not stopping:
            for name, proc in list(children.items()):
                if proc.poll() is None or stopping:
                    continue
                recent = [t for t in restarts[name] if time.monotonic() - t < 60]
                if len(recent) >= 3:
                    logger.error("%s keeps exiting (code %s); stopping", name, proc.returncode)
                    stopping = True
                    break
                logger.warning("%s exited with code %s; restarting it", name, proc.returncode)
                restarts[name] = [*recent, time.monotonic()]
                children[name] = subprocess.Popen(commands[name], env=env)
            time.sleep(0.3)
    finally:
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, proc in children.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                proc.kill()
        if server is not None:
            server.stop()
        logger.info("stopped")
    failed = [n for n, p in children.items() if p.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if failed and not stopping else 0


def api_key(args: argparse.Namespace, settings: Settings) -> str | None:
    """--api-key, OFA_API_KEY, or the key `ofa-entail up` generated in data_dir."""
    key = args.api_key or os.environ.get("OFA_API_KEY")
    if not key:
        stored = read_env_file(settings.data_dir / SECRETS_FILE).get("OFA_API_KEYS", "")
        key = stored.split(",")[0] if stored else None
    if not key:
        print(
            "error: no API key (--api-key, OFA_API_KEY, or run `ofa-entail up` here)",
            file=sys.stderr,
        )
    return key


def cmd_scan(args: argparse.Namespace) -> int:
    """Submit a manifest, show a live progress bar, write the results."""
    import httpx
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    settings = get_settings()
    key = api_key(args, settings)
    if not key:
        return 2
    base = (args.url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")
    manifest = Path(args.manifest)
    fmt = args.format or ("csv" if (args.out or "").endswith(".csv") else "jsonl")
    console = Console(stderr=True)
    data = {"callback_url": args.callback_url} if args.callback_url else {}
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=base, headers=headers, timeout=300) as client:
        with manifest.open("rb") as fh:
            resp = client.post("/v1/scans", files={"manifest": (manifest.name, fh)}, data=data)
        if resp.status_code >= 400:
            detail = resp.json().get("detail", resp.text) if resp.content else resp.text
            print(f"error: HTTP {resp.status_code}: {detail}", file=sys.stderr)
            return 1
        scan = resp.json()
        scan_id = scan["scan_id"]
        columns = (
            SpinnerColumn(),
            TextColumn("scan {task.fields[scan]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "cached {task.fields[cached]} · failed {task.fields[failed]} · "
                "{task.fields[rate]:.0f} rows/s"
            ),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(
                "scan", total=scan["total"], scan=scan_id[:8], cached=0, failed=0, rate=0.0
            )
            while True:
                doc = client.get(f"/v1/scans/{scan_id}").json()
                progress.update(
                    task,
                    completed=doc["done"] + doc["failed"],
                    cached=doc["cached"],
                    failed=doc["failed"],
                    rate=doc["rate_rows_per_s"],
                )
                if doc["status"] in ("succeeded", "cancelled", "failed"):
                    break
                time.sleep(0.5)
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(Path(args.out).open("wb")) if args.out else sys.stdout.buffer
            stream = stack.enter_context(
                client.stream("GET", f"/v1/scans/{scan_id}/results", params={"format": fmt})
            )
            for chunk in stream.iter_bytes():
                out.write(chunk)
        where = f"; results in {args.out}" if args.out else ""
        console.print(
            f"scan {scan_id} {doc['status']}: {doc['done']} done ({doc['cached']} cached), "
            f"{doc['failed']} failed{where}"
        )
    return 0 if doc["status"] == "succeeded" else 1


def cmd_check(args: argparse.Namespace) -> int:
    """Submit an image and a sentence to a running service and wait for the verdict."""
    import httpx
    from rich.console import Console

    from shared.cli import _print_verdict

    settings = get_settings()
    key = api_key(args, settings)
    if not key:
        return 2
    base = (args.url or f"http://{settings.api_host}:{settings.api_port}").rstrip("/")
    headers = {"Authorization": f"Bearer {key}"}
    image = Path(args.image)
    data = {"text": args.text} | ({"premise": args.premise} if args.premise else {})
    console = Console(stderr=True)
    deadline = time.monotonic() + args.timeout
    with httpx.Client(base_url=base, headers=headers, timeout=30) as client:
        with image.open("rb") as fh:
            resp = client.post("/v1/jobs", data=data, files={"image": (image.name, fh)})
        if resp.status_code >= 400:
            body = resp.json() if resp.headers.get("content-type", "").endswith("json") else {}
            print(
                f"error: HTTP {resp.status_code}: {body.get('detail', resp.text)}", file=sys.stderr
            )
            return 1
        doc = resp.json()
        if resp.status_code == 202:
            job_id = doc["job_id"]
            with console.status(f"job {job_id} queued…", spinner="dots") as status:
                while True:
                    doc = client.get(f"/v1/jobs/{job_id}").json()
                    status.update(f"job {job_id} {doc['status']}…")
                    if doc["status"] in ("succeeded", "failed"):
                        break
                    if time.monotonic() > deadline:
                        print(
                            f"error: job {job_id} still {doc['status']} after {args.timeout:g}s",
                            file=sys.stderr,
                        )
                        return 1
                    time.sleep(0.2)
        if doc["status"] == "failed":
            print(f"error: job failed: {doc.get('error')}", file=sys.stderr)
            return 1
        if doc.get("cached"):
            console.print("(from cache)")
        _print_verdict(doc["verdict"], args.json)
    return 0


def add_commands(sub: Any) -> None:
    """Register the service sub-commands on ``sub``."""
    p = sub.add_parser("up", help="run everything here: Redis (embedded), worker, API, Flower")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run a worker holding the model")
    p.add_argument("--concurrency", type=int, help="threads (default: OFA_WORKER_THREADS)")
    p.add_argument("--name", help="node name prefix (default: ofa)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("coordinator", help="run the scan coordinator (no GPU)")
    p.add_argument("--concurrency", type=int, default=4, help="scans worked on at once")
    p.add_argument("--name", help="node name prefix (default: coordinator)")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("scan", help="scan a manifest through a running service")
    p.add_argument("manifest", help="JSONL or CSV: id, image, text[, premise, sha256]")
    p.add_argument("--out", help="results file (default: standard output)")
    p.add_argument("--format", choices=["jsonl", "csv"], help="results format (default: by --out)")
    p.add_argument("--url", help="API base URL (default: from settings)")
    p.add_argument("--api-key", help="default: OFA_API_KEY, or data_dir/secrets.env")
    p.add_argument("--callback-url", help="POSTed the signed summary when the scan ends")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("api", help="serve the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("flower", help="run Flower (monitoring) with basic auth")
    p.set_defaults(func=cmd_flower)

    p = sub.add_parser("check", help="ask a running service about one image and sentence")
    p.add_argument("image", help="image file")
    p.add_argument("text", help="the hypothesis")
    p.add_argument("--premise")
    p.add_argument("--url", help="API base URL (default: from settings)")
    p.add_argument("--api-key", help="default: OFA_API_KEY, or data_dir/secrets.env")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)
