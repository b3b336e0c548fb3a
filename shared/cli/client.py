"""The commands that talk to a running service over HTTP: ``check`` and ``scan``."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
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


def _base_url(args: argparse.Namespace, settings: Settings) -> str:
    return args.url or f"http://{settings.api_host}:{settings.api_port}"


def cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
    """Submit a manifest, show a live progress bar, write the results."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    from shared.client import ApiError, Client
    from shared.models import ScanSummary

    key = api_key(args, settings)
    if not key:
        return 2
    fmt = args.format or ("csv" if (args.out or "").endswith(".csv") else "jsonl")
    console = Console(stderr=True)
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
    with Client(_base_url(args, settings), key, timeout=300) as client:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("scan", total=None, scan="", cached=0, failed=0, rate=0.0)

            def show(doc: ScanSummary) -> None:
                progress.update(
                    bar,
                    total=doc.total,
                    completed=doc.done + doc.failed,
                    scan=doc.scan_id[:8],
                    cached=doc.cached,
                    failed=doc.failed,
                    rate=doc.rate_rows_per_s,
                )

            try:
                doc = client.scan(args.manifest, on_progress=show, callback_url=args.callback_url)
            except ApiError as exc:
                print(f"error: HTTP {exc.status}: {exc.detail}", file=sys.stderr)
                return 1
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(Path(args.out).open("wb")) if args.out else sys.stdout.buffer
            for _ in client.scan_results(doc.scan_id, fmt, out=out):
                pass
        if args.report:
            Path(args.report).write_text(client.scan_report_html(doc.scan_id), encoding="utf-8")
    where = f"; results in {args.out}" if args.out else ""
    if args.report:
        where += f"; report in {args.report}"
    console.print(
        f"scan {doc.scan_id} {doc.status}: {doc.done} done ({doc.cached} cached), "
        f"{doc.failed} failed{where}"
    )
    return 0 if doc.status == "succeeded" else 1


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Submit an image and a sentence to a running service and wait for the verdict."""
    from rich.console import Console

    from shared.client import ApiError, Client, JobFailed, WaitTimeout

    key = api_key(args, settings)
    if not key:
        return 2
    console = Console(stderr=True)
    with Client(_base_url(args, settings), key) as client:
        try:
            with console.status("waiting for the verdict…", spinner="dots"):
                result = client.check(args.image, args.text, args.premise, timeout=args.timeout)
        except ApiError as exc:
            print(f"error: HTTP {exc.status}: {exc.detail}", file=sys.stderr)
            return 1
        except (JobFailed, WaitTimeout) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if result.cached:
        console.print("(from cache)")
    print_verdict(result.verdict.model_dump(), args.json)
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
    p.add_argument(
        "--report",
        help="write an HTML report (accuracy, confusion matrix, precision-recall curves) "
        "over rows that carry a gold label",
    )
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
