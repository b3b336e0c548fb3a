"""The Python client (``ofa_entail_client``) against the running service: what needs
the repository's fixtures (the model scored directly, an API no worker serves). Its
other behaviours are its own tests, clients/python/tests, run against this service by
tests/clients/test_python_client.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from ofa_entail_client import AsyncClient, Client, WaitTimeout

from tests.helpers import API_KEY, encode_image, photo, small_jpeg, start_api
from worker.ofa.checkpoint import load_checkpoint
from worker.ofa.entail import Entailer


@pytest.fixture(scope="module")
def direct(tiny_dir: Path) -> Entailer:
    return Entailer(load_checkpoint(tiny_dir), device="cpu")


def test_check_agrees_with_the_model(api, worker, direct, tmp_path):
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


def test_async_client_check_agrees_with_the_model(api, worker, direct):
    image = small_jpeg(seed=778)

    async def go():
        async with AsyncClient(api, API_KEY) as ofa:
            return await ofa.check(image, "async check")

    result = asyncio.run(go())
    want = direct.predict(image, "async check")
    assert result.verdict.label == want.label and not result.cached
