"""The commands that talk to a running service over HTTP: ``check`` and ``scan``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from shared.cli.output import print_verdict
from shared.cli.secrets import stored_api_key
from shared.settings import Settings


def api_key(args: argparse.Namespace, settings: Settings) -> str | None:
    """--api-key, OFA_API_KEY, or the key `ofa-entail up` generated in data_dir."""
    key = args.api_key or os.environ.get("OFA_API_KEY") or stored_api_key(settings)
    if not key:
        print(
            "error: no API key (--api-key, OFA_API_KEY, or run `ofa-entail up` here)",
            file=sys.stderr,
        )
    return key


def cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
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


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Submit an image and a sentence to a running service and wait for the verdict."""
    import httpx
    from rich.console import Console

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
        print_verdict(doc["verdict"], args.json)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``check`` and ``scan``."""
    p = sub.add_parser("scan", help="scan a manifest through a running service")
    p.add_argument("manifest", help="JSONL or CSV: id, image, text[, premise, sha256]")
    p.add_argument("--out", help="results file (default: standard output)")
    p.add_argument("--format", choices=["jsonl", "csv"], help="results format (default: by --out)")
    p.add_argument("--url", help="API base URL (default: from settings)")
    p.add_argument("--api-key", help="default: OFA_API_KEY, or data_dir/secrets.env")
    p.add_argument("--callback-url", help="POSTed the signed summary when the scan ends")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("check", help="ask a running service about one image and sentence")
    p.add_argument("image", help="image file")
    p.add_argument("text", help="the hypothesis")
    p.add_argument("--premise")
    p.add_argument("--url", help="API base URL (default: from settings)")
    p.add_argument("--api-key", help="default: OFA_API_KEY, or data_dir/secrets.env")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)
