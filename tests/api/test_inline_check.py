"""Where the API checks an image: a small file that also declares few pixels on the
event loop; a small file that declares many (slow to decode) in the thread pool."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import api.routes.jobs as routes
from api.app import create_app
from tests.helpers import API_KEY, encode_image, small_jpeg

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def where(inproc_settings, monkeypatch) -> Iterator[tuple[TestClient, list[str]]]:
    """The app, and where each of its image checks ran (the real check still runs)."""
    ran: list[str] = []
    check = routes.check_image

    def recorded(data: bytes, max_pixels: int) -> None:
        try:
            asyncio.get_running_loop()
            ran.append("event loop")
        except RuntimeError:
            ran.append("thread")
        check(data, max_pixels)

    monkeypatch.setattr(routes, "check_image", recorded)
    with TestClient(create_app(inproc_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client, ran


def test_small_files_of_few_pixels_are_checked_on_the_event_loop(where):
    client, ran = where
    image = small_jpeg(seed=31)
    assert len(image) <= routes.INLINE_CHECK_BYTES
    resp = client.post("/v1/jobs", data={"text": "a"}, files={"image": ("a.jpg", image)})
    assert resp.status_code == 202, resp.text
    assert ran == ["event loop"]


def test_small_files_of_many_pixels_are_checked_in_a_thread(where):
    client, ran = where
    image = encode_image(Image.new("RGB", (1500, 1500), "red"), "WEBP", lossless=True)
    assert len(image) <= routes.INLINE_CHECK_BYTES  # small, yet 2.25 MP to decode
    resp = client.post("/v1/jobs", data={"text": "a"}, files={"image": ("a.webp", image)})
    assert resp.status_code == 202, resp.text
    assert ran == ["thread"]
