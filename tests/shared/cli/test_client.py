"""``ofa-entail scan``'s parts a scheduler relies on: the exit code of each outcome, the
idempotency key's ``{date}``, and its arguments (the end-to-end runs are in
tests/e2e/test_scans.py)."""

from __future__ import annotations

import datetime

import pytest
from ofa_entail_client import ScanSummary

from shared.cli import build_parser, main
from shared.cli.client import idempotency_key, scan_exit_code


@pytest.mark.parametrize(
    ("status", "failed", "code"),
    [
        ("succeeded", 0, 0),
        ("succeeded", 2, 4),
        ("failed", 0, 3),
        ("cancelled", 0, 3),
        ("running", 0, 5),
        ("queued", 0, 5),
    ],
)
def test_each_outcome_has_its_exit_code(status, failed, code):
    doc = ScanSummary(scan_id="s", status=status, failed=failed)
    assert scan_exit_code(doc) == code


def test_the_idempotency_key_takes_todays_utc_date():
    assert idempotency_key("shop-eu-{date}", datetime.date(2026, 1, 31)) == "shop-eu-2026-01-31"
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    assert idempotency_key("n-{date}") in (f"n-{today}", f"n-{datetime.date.today()}")
    assert idempotency_key("fixed") == "fixed" and idempotency_key(None) is None


def test_schedule_arguments_parse():
    args = build_parser().parse_args(
        ["scan", "--manifest-url", "s3://b/m.jsonl", "--catalogue", "shop-eu",
         "--idempotency-key", "shop-eu-{date}", "--no-wait", "--json", "--timeout", "60",
         "--results-url", "s3://b/out.parquet", "--results-format", "parquet"]
    )  # fmt: skip
    assert args.manifest is None and not args.wait and args.json and args.timeout == 60
    assert build_parser().parse_args(["scan", "m.jsonl"]).wait is True


def test_a_manifest_and_a_manifest_url_together_are_a_usage_error(capsys):
    code = main(["scan", "m.jsonl", "--manifest-url", "s3://b/m.jsonl", "--api-key", "k"])
    assert code == 2 and "one of them" in capsys.readouterr().err
    assert main(["scan", "--api-key", "k"]) == 2


def test_an_unreachable_service_is_exit_code_1(tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "1", "image": "x.jpg", "text": "t"}\n')
    code = main(["scan", str(manifest), "--url", "http://127.0.0.1:9", "--api-key", "k"])
    assert code == 1 and "did not answer" in capsys.readouterr().err
