"""``Client`` and ``AsyncClient`` against a running service (see conftest.py)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import pytest

from ofa_entail_client import (
    ApiError,
    AsyncClient,
    CheckResult,
    Client,
    Job,
    JobStatus,
    ScanStatus,
    ScanSummary,
)

LABELS = {"entailment", "contradiction", "neutral"}


def test_check_then_cache_hit(url, api_key, image, nonce, tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(image)
    with Client(url, api_key) as ofa:
        first = ofa.check(path, f"A cat rests {nonce}.", "A photo.")
        assert isinstance(first, CheckResult)
        assert not first.cached and first.job_id and first.verdict.label in LABELS
        probabilities = first.verdict.probabilities.model_dump()
        assert set(probabilities) == LABELS
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-4)
        assert len(first.verdict.key) == 64 and first.verdict.model.id
        # The texts are normalised before the lookup: the same job, answered from the cache.
        again = ofa.check(image, f"a cat rests {nonce}.", "A photo.")
        assert again.cached and again.job_id is None and again.verdict == first.verdict
        submitted = ofa.submit(path, f"A cat rests {nonce}.", "A photo.")
        assert submitted.cached and submitted.verdict == first.verdict
        job = ofa.job(first.job_id)
        assert isinstance(job, Job) and job.status == JobStatus.SUCCEEDED
        assert job.verdict == first.verdict and job.status.finished


def test_submit_then_wait(url, api_key, image, nonce):
    with Client(url, api_key) as ofa:
        submitted = ofa.submit(image, f"submitted {nonce}")
        assert not submitted.cached and submitted.job_id and submitted.verdict is None
        job = ofa.wait(submitted.job_id, timeout=60)
        assert job.job_id == submitted.job_id and job.status == "succeeded"
        assert job.verdict is not None and job.verdict.label in LABELS and job.error is None
        assert job.created_at and job.finished_at and job.finished_at >= job.created_at


def test_bad_input_raises_with_the_problem_detail(url, api_key):
    with Client(url, api_key) as ofa, pytest.raises(ApiError) as err:
        ofa.check(b"this is not an image", "x")
    assert err.value.status == 415 and err.value.type.endswith("/unsupported-image")
    assert "not an image format" in err.value.detail
    with Client(url, "wrong-key") as anonymous, pytest.raises(ApiError) as denied:
        anonymous.job("whatever")
    assert denied.value.status == 401


def test_an_unknown_job_is_404(url, api_key):
    with Client(url, api_key) as ofa, pytest.raises(ApiError) as err:
        ofa.job("0" * 32)
    assert err.value.status == 404 and str(err.value).startswith("HTTP 404")


def manifest_of(tmp_path: Path, image: bytes, texts: list[str]) -> Path:
    data_url = "data:image/png;base64," + base64.b64encode(image).decode()
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"a{i}", "image": data_url, "text": text}) + "\n"
            for i, text in enumerate(texts)
        )
    )
    return manifest


def test_async_client_check_and_scan_with_progress(url, api_key, image, nonce, tmp_path):
    manifest = manifest_of(tmp_path, image, [f"async {i} {nonce}" for i in range(3)])
    seen: list[ScanSummary] = []

    async def go() -> tuple:
        async with AsyncClient(url, api_key) as ofa:
            result = await ofa.check(image, f"async check {nonce}")
            summary = await ofa.scan(manifest, on_progress=seen.append, poll_s=0.1)
            return result, summary

    result, summary = asyncio.run(go())
    assert result.verdict.label in LABELS and not result.cached
    assert summary.status == "succeeded" and summary.done == 3 and summary.total == 3
    assert seen and seen[-1] == summary and all(s.scan_id == summary.scan_id for s in seen)


def test_scan_results_and_report(url, api_key, image, nonce, tmp_path):
    texts = [f"report {i} {nonce}" for i in range(3)]
    manifest = manifest_of(tmp_path, image, texts)
    with Client(url, api_key) as ofa:
        summary = ofa.scan(manifest, poll_s=0.1)
        assert summary.status == ScanStatus.SUCCEEDED and summary.status.finished
        assert ofa.scan_status(summary.scan_id) == summary
        out = io.BytesIO()
        streamed = b"".join(ofa.scan_results(summary.scan_id, out=out))
        assert streamed == out.getvalue()
        rows = [json.loads(line) for line in streamed.decode().splitlines()]
        assert [r["id"] for r in rows] == ["a0", "a1", "a2"]
        assert all(r["label"] in LABELS and not r["error"] for r in rows)
        report = ofa.scan_report(summary.scan_id)
        assert report.scan_id == summary.scan_id and report.labelled == 0  # no gold labels
        assert "<html" in ofa.scan_report_html(summary.scan_id).lower()
        with pytest.raises(ApiError) as err:
            ofa.scan_status("0" * 32)
        assert err.value.status == 404


def test_catalogue_scans_count_their_changes_and_starts_are_idempotent(
    url, api_key, image, nonce, tmp_path
):
    good = "data:image/png;base64," + base64.b64encode(image).decode()
    bad = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    catalogue = f"client-{nonce}"

    def manifest(name: str, rows: list[tuple[str, str]]) -> Path:
        path = tmp_path / name
        path.write_text(
            "".join(
                json.dumps({"id": i, "image": img, "text": f"catalogue {i} {nonce}"}) + "\n"
                for i, img in rows
            )
        )
        return path

    first = manifest("1.jsonl", [("keep", good), ("breaks", good), ("gone", good)])
    second = manifest("2.jsonl", [("keep", good), ("breaks", bad), ("new", good)])
    with Client(url, api_key) as ofa:
        one = ofa.scan(first, poll_s=0.1, catalogue=catalogue)
        assert one.catalogue == catalogue and one.changes is None  # nothing to compare with
        key = f"{catalogue}-2"
        started = ofa.start_scan(second, catalogue=catalogue, idempotency_key=key)
        again = ofa.start_scan(second, catalogue=catalogue, idempotency_key=key)
        assert again.scan_id == started.scan_id
        with pytest.raises(ApiError) as err:
            ofa.start_scan(first, catalogue=catalogue, idempotency_key=key)
        assert err.value.status == 409
        two = ofa.follow_scan(started, poll_s=0.1)
        assert two.baseline_scan == one.scan_id
        assert two.changes is not None
        assert (two.changes.newly_failed, two.changes.added, two.changes.removed) == (1, 1, 1)
        assert two.changes.label_changed == 0 and two.changes.recovered == 0
        changes = list(ofa.iter_changes(two.scan_id))
        assert [(c.kind, c.id) for c in changes] == [
            ("newly_failed", "breaks"),
            ("added", "new"),
            ("removed", "gone"),
        ]
        assert changes[0].old_label in LABELS and changes[0].new_error
        csv_text = b"".join(ofa.scan_changes(two.scan_id, "csv")).decode()
        assert csv_text.splitlines()[0].startswith("kind,id,old_label")

    async def go() -> list:
        async with AsyncClient(url, api_key) as ofa:
            return await ofa.iter_changes(two.scan_id)

    assert asyncio.run(go()) == changes
