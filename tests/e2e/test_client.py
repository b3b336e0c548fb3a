"""The Python client (``shared.client``) against the running service."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from shared.client import ApiError, AsyncClient, Client, WaitTimeout
from shared.models import ScanSummary
from tests.helpers import API_KEY, encode_image, photo, small_jpeg, start_api
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer


@pytest.fixture(scope="module")
def direct(tiny_dir: Path) -> Entailer:
    return Entailer(load_checkpoint(tiny_dir), device="cpu")


def test_check_then_cache_hit(api, worker, direct, tmp_path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(encode_image(photo("chelsea").resize((90, 60))))
    with Client(api, API_KEY) as ofa:
        first = ofa.check(image, "A cat rests.", "A photo.")
        want = direct.predict(image.read_bytes(), "A cat rests.", "A photo.")
        assert not first.cached and first.job_id and first.verdict.label == want.label
        assert first.verdict.probabilities.model_dump() == pytest.approx(
            want.probabilities, abs=1e-6
        )
        again = ofa.check(image.read_bytes(), "a cat rests.", "A photo.")
        assert again.cached and again.job_id is None and again.verdict == first.verdict
        submitted = ofa.submit(image, "A cat rests.", "A photo.")
        assert submitted.cached and submitted.verdict == first.verdict


def test_bad_input_raises_with_the_problem_detail(api):
    with Client(api, API_KEY) as ofa, pytest.raises(ApiError) as err:
        ofa.check(b"this is not an image", "x")
    assert err.value.status == 415 and err.value.type.endswith("/unsupported-image")
    assert "not an image format" in err.value.detail
    with Client(api, "wrong-key") as anonymous, pytest.raises(ApiError) as denied:
        anonymous.job("whatever")
    assert denied.value.status == 401


def test_a_job_that_does_not_finish_in_time_raises(service_env, rdb, keys, tmp_path):
    # An API serving a revision no worker serves: the job stays queued.
    proc, base = start_api(service_env, tmp_path / "api.log", OFA_MODEL_REVISION="seed-none")
    try:
        with Client(base, API_KEY) as ofa, pytest.raises(WaitTimeout) as err:
            ofa.check(small_jpeg(seed=777), "nobody computes this", timeout=1.0)
        assert err.value.job.status == "queued"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        rdb.delete(keys.job(err.value.job.job_id), "ofa.interactive.tiny-random@seed-none")


def test_async_client_check_and_scan_with_progress(api, worker, coordinator, direct, tmp_path):
    image = small_jpeg(seed=778)
    manifest = tmp_path / "m.jsonl"
    import base64

    data_url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    manifest.write_text(
        "".join(
            json.dumps({"id": f"a{i}", "image": data_url, "text": f"async {i}"}) + "\n"
            for i in range(3)
        )
    )
    seen: list[ScanSummary] = []

    async def go() -> tuple:
        async with AsyncClient(api, API_KEY) as ofa:
            result = await ofa.check(image, "async check")
            summary = await ofa.scan(manifest, on_progress=seen.append, poll_s=0.1)
            return result, summary

    result, summary = asyncio.run(go())
    want = direct.predict(image, "async check")
    assert result.verdict.label == want.label and not result.cached
    assert summary.status == "succeeded" and summary.done == 3 and summary.total == 3
    assert seen and seen[-1] == summary and all(s.scan_id == summary.scan_id for s in seen)
