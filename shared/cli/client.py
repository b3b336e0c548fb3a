"""The commands that talk to a running service over HTTP: ``check`` and ``scan``."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from pathlib import Path
from typing import IO, TYPE_CHECKING

from shared.cli.output import print_verdict
from shared.cli.secrets import stored_api_key
from shared.settings import Settings

if TYPE_CHECKING:
    from ofa_entail_client import ScanSummary


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


# ``ofa-entail scan``'s exit codes, for schedulers (argparse's own usage errors are 2).
EXIT_SUCCEEDED = 0  # the scan succeeded and no row failed (or, --no-wait, it started)
EXIT_ERROR = 1  # the command failed: the service unreachable, or it refused the start
EXIT_USAGE = 2  # bad arguments
EXIT_SCAN_FAILED = 3  # the scan failed or was cancelled
EXIT_PARTLY_FAILED = 4  # the scan succeeded, but some rows failed
EXIT_STILL_RUNNING = 5  # --timeout passed before the scan ended

SCAN_EXIT_CODES = """exit codes: 0 succeeded with no row failed (with --no-wait: started);
1 the command failed (service unreachable, start refused); 2 bad arguments;
3 the scan failed or was cancelled; 4 it succeeded but some rows failed;
5 still running when --timeout passed."""


def idempotency_key(template: str | None, today: datetime.date | None = None) -> str | None:
    """--idempotency-key with ``{date}`` replaced by today's UTC date (YYYY-MM-DD), so
    that a schedule derives one key per day without a shell."""
    if not template:
        return None
    day = today or datetime.datetime.now(datetime.UTC).date()
    return template.replace("{date}", day.isoformat())


def scan_exit_code(doc: ScanSummary) -> int:
    """The exit code a scan's summary comes to."""
    if not doc.status.finished:
        return EXIT_STILL_RUNNING
    if doc.status != "succeeded":
        return EXIT_SCAN_FAILED
    return EXIT_PARTLY_FAILED if doc.failed else EXIT_SUCCEEDED


def cmd_scan(args: argparse.Namespace, settings: Settings) -> int:
    """Start a scan (a manifest file, or an object URL), follow it with a progress bar
    on standard error, write the results; ``--json``: one summary object on standard
    output. The exit code says how it went (``SCAN_EXIT_CODES``)."""
    import httpx
    from ofa_entail_client import ApiError, Client
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeRemainingColumn,
    )

    if (args.manifest is None) == (args.manifest_url is None):
        print("error: give a manifest file or --manifest-url (one of them)", file=sys.stderr)
        return EXIT_USAGE
    key = api_key(args, settings)
    if not key:
        return EXIT_USAGE
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
    start = {
        "catalogue": args.catalogue,
        "idempotency_key": idempotency_key(args.idempotency_key),
        "manifest_url": args.manifest_url,
        "results_url": args.results_url,
        "results_format": args.results_format,
    }
    with Client(_base_url(args, settings), key, timeout=300) as client:
        try:
            with Progress(*columns, console=console, disable=args.json) as progress:
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

                doc = client.start_scan(args.manifest, args.callback_url, **start)
                if args.wait:
                    doc = client.follow_scan(doc, on_progress=show, timeout=args.timeout)
            code = scan_exit_code(doc) if args.wait else EXIT_SUCCEEDED
            if doc.status.finished:
                with contextlib.ExitStack() as stack:
                    out: IO[bytes] | None = None
                    if args.out:
                        out = stack.enter_context(Path(args.out).open("wb"))
                    elif not args.json:
                        out = sys.stdout.buffer
                    if out is not None:
                        for _ in client.scan_results(doc.scan_id, fmt, out=out):
                            pass
                if args.report:
                    html = client.scan_report_html(doc.scan_id)
                    Path(args.report).write_text(html, encoding="utf-8")
        except ApiError as exc:
            print(f"error: HTTP {exc.status}: {exc.detail}", file=sys.stderr)
            return EXIT_ERROR
        except httpx.HTTPError as exc:
            print(f"error: the service did not answer ({exc})", file=sys.stderr)
            return EXIT_ERROR
    if args.json:
        print(json.dumps({**doc.model_dump(mode="json"), "exit_code": code}))
    where = f"; results in {args.out}" if args.out and doc.status.finished else ""
    if args.report and doc.status.finished:
        where += f"; report in {args.report}"
    if doc.changes is not None:
        c = doc.changes
        where += (
            f"; since {doc.baseline_scan}: {c.label_changed} labels changed, "
            f"{c.newly_failed} newly failed, {c.recovered} recovered, {c.added} added, "
            f"{c.removed} removed"
        )
    console.print(
        f"scan {doc.scan_id} {doc.status}: {doc.done} done ({doc.cached} cached), "
        f"{doc.failed} failed{where}",
        highlight=False,
        soft_wrap=True,
    )
    return code


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    """Submit an image and a sentence to a running service and wait for the verdict."""
    from ofa_entail_client import ApiError, Client, JobFailed, WaitTimeout
    from rich.console import Console

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
    p = sub.add_parser(
        "scan",
        help="scan a manifest through a running service",
        description="Start a scan of a manifest (a file uploaded, or --manifest-url) and, "
        "unless --no-wait, follow it to its end.",
        epilog=SCAN_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "manifest", nargs="?", help="JSONL or CSV: id, image, text[, premise, sha256, label]"
    )
    p.add_argument(
        "--manifest-url", help="the manifest in object storage (s3://, gs://, az://) instead"
    )
    p.add_argument("--out", help="results file (default: standard output, unless --json)")
    p.add_argument("--format", choices=["jsonl", "csv"], help="results format (default: by --out)")
    p.add_argument("--results-url", help="the server writes the results here (s3://, gs://, az://)")
    p.add_argument("--results-format", choices=["jsonl", "csv", "parquet"])
    p.add_argument(
        "--catalogue",
        help="the catalogue the scan belongs to: what changed since its previous "
        "succeeded scan is counted",
    )
    p.add_argument(
        "--idempotency-key",
        help="a start repeated with the same key and arguments within a day returns the "
        "first one's scan; {date} becomes today's UTC date (YYYY-MM-DD)",
    )
    p.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="follow the scan to its end (default), or only start it",
    )
    p.add_argument(
        "--timeout", type=float, help="stop waiting after this many seconds (exit code 5)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON summary on standard output (progress stays on standard error)",
    )
    p.add_argument("--url", help="API base URL (default: from settings)")
    p.add_argument("--api-key", help="default: OFA_API_KEY, or data_dir/secrets.env")
    p.add_argument("--callback-url", help="POSTed the signed summary when the scan ends")
    p.add_argument(
        "--report",
        help="write an HTML report (accuracy, confusion matrix, precision-recall curves "
        "over rows that carry a gold label; a catalogue scan's changes)",
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
