"""The commands that run the service's processes: ``up`` (everything, supervised),
``api``, ``worker``, ``coordinator`` and ``flower``.

Each process is launched by module path (``worker.app:app``, ``api.app:create_app``),
so this module imports neither the model runtime nor the web stack.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from shared import wiring
from shared.cli.secrets import SECRETS_FILE, ensure_secrets
from shared.settings import Settings

logger = logging.getLogger("ofa_entail")


def celery_worker_argv(
    app: str, queues: list[str], concurrency: int, name: str, verbose: bool
) -> list[str]:
    """``python -m celery`` running a threads-pool worker of ``app`` on ``queues``."""
    return [
        sys.executable,
        "-m",
        "celery",
        f"--app={app}",
        "worker",
        "--pool=threads",
        f"--concurrency={concurrency}",
        f"--queues={','.join(queues)}",
        "--task-events",
        "--without-mingle",
        "--without-gossip",
        f"--loglevel={'DEBUG' if verbose else 'INFO'}",
        f"--hostname={name}@%h",
    ]


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Run a Celery worker holding the model (one process per device)."""
    from shared.wire import queue_name

    # Celery's consumer takes the interactive queue (run in groups: worker/groups.py);
    # the bulk queue has its own consumer in the worker (worker/bulk.py).
    queues = [queue_name(*settings.model_tag)]
    argv = celery_worker_argv(
        "worker.app:app",
        queues,
        args.concurrency or settings.interactive_prefetch,
        args.name or "ofa",
        args.verbose,
    )
    os.execv(sys.executable, argv)  # the same process: supervisors and signals see celery


def cmd_coordinator(args: argparse.Namespace, settings: Settings) -> int:
    """Run the scan coordinator (no GPU, no torch): a Celery worker on the scans queue."""
    from shared.wire import SCAN_QUEUE

    argv = celery_worker_argv(
        "worker.scans.app:app",
        [SCAN_QUEUE],
        args.concurrency,
        args.name or "coordinator",
        args.verbose,
    )
    os.execv(sys.executable, argv)


def cmd_api(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the HTTP API with uvicorn."""
    import uvicorn

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


def flower_command(settings: Settings, password: str) -> tuple[list[str], dict[str, str]]:
    """Flower's command line and the environment that carries its credentials (never
    argv: any local user can read a process's command line)."""
    argv = [
        sys.executable,
        "-m",
        "celery",
        "--app=shared.celery_app:app",
        "flower",
        f"--address={settings.flower_host}",
        f"--port={settings.flower_port}",
        "--persistent=False",
    ]
    return argv, {"FLOWER_BASIC_AUTH": f"{settings.flower_user}:{password}"}


def cmd_flower(_: argparse.Namespace, settings: Settings) -> int:
    """Run Flower (monitoring UI and /metrics) with basic auth from settings."""
    if settings.flower_password is None:
        print(
            "error: set OFA_FLOWER_PASSWORD (Flower always runs with basic auth)", file=sys.stderr
        )
        return 2
    argv, env = flower_command(settings, settings.flower_password.get_secret_value())
    return subprocess.call(argv, env={**os.environ, **env})


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Everything on one machine: embedded Valkey (if no Redis set), worker, scan
    coordinator, API, Flower; children that exit are restarted."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(ensure_secrets(settings))
    server: Any = None
    if not settings.redis_url:
        from shared.embedded import start_embedded

        server = start_embedded(settings.data_dir.resolve())
        env["OFA_REDIS_URL"] = server_url = f"redis://127.0.0.1:{server.port}/0"
    else:
        server_url = settings.redis_url
    env["OFA_DATA_DIR"] = str(settings.data_dir.resolve())
    cli = [sys.executable, "-m", "shared.cli"]
    flower_argv, flower_env = flower_command(settings, env["OFA_FLOWER_PASSWORD"])
    commands: dict[str, tuple[list[str], dict[str, str]]] = {
        "worker": ([*cli, "worker"], env),
        "coordinator": ([*cli, "coordinator"], env),
        "api": ([*cli, "api"], env),
        "flower": (flower_argv, {**env, **flower_env}),
    }
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, (argv, child_env) in commands.items():
            children[name] = subprocess.Popen(argv, env=child_env)
        model_id, revision = settings.model_tag
        secrets_path = settings.data_dir / SECRETS_FILE
        logger.info("Redis:  %s", wiring.redact(server_url))  # never its password
        logger.info("API:    http://%s:%d  (docs at /docs)", settings.api_host, settings.api_port)
        logger.info(
            "Flower: http://%s:%d  (user %s, password in %s)",
            settings.flower_host,
            settings.flower_port,
            settings.flower_user,
            secrets_path,
        )
        logger.info("Model:  %s@%s from %s", model_id, revision, settings.model_ref)
        logger.info("API key in %s; press Ctrl-C to stop", secrets_path)
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
                argv, child_env = commands[name]
                children[name] = subprocess.Popen(argv, env=child_env)
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


def cmd_probe(args: argparse.Namespace, settings: Settings) -> int:
    """0 when the worker is ready (model loaded) or alive (heartbeat recent), else 1."""
    if settings.health_dir is None:
        print("error: OFA_HEALTH_DIR is not set", file=sys.stderr)
        return 1
    path = settings.health_dir / args.what
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        print(f"not {args.what}: {path} does not exist", file=sys.stderr)
        return 1
    if args.what == "alive" and age > args.max_age:
        print(f"not alive: last heartbeat {age:.0f}s ago", file=sys.stderr)
        return 1
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the commands that run the service."""
    p = sub.add_parser("up", help="run everything here: Redis (embedded), worker, API, Flower")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("worker", help="run a worker holding the model")
    p.add_argument(
        "--concurrency",
        type=int,
        help="interactive messages held at once"
        " (default: OFA_INTERACTIVE_PREFETCH, else 4 batches)",
    )
    p.add_argument("--name", help="node name prefix (default: ofa)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("coordinator", help="run the scan coordinator (no GPU)")
    p.add_argument("--concurrency", type=int, default=4, help="scans worked on at once")
    p.add_argument("--name", help="node name prefix (default: coordinator)")
    p.set_defaults(func=cmd_coordinator)

    p = sub.add_parser("api", help="serve the HTTP API")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    p.set_defaults(func=cmd_api)

    p = sub.add_parser("flower", help="run Flower (monitoring) with basic auth")
    p.set_defaults(func=cmd_flower)

    p = sub.add_parser(
        "probe", help="a worker's readiness or liveness, from its probe files (OFA_HEALTH_DIR)"
    )
    p.add_argument("what", choices=("ready", "alive"))
    p.add_argument("--max-age", type=float, default=60.0, help="alive: seconds (default 60)")
    p.set_defaults(func=cmd_probe)
