"""Checking a webhook URL when it is given (``api/callbacks.py``): http(s) only, a
host, a length cap, a signing secret on the server, and the image URLs' guard against
private and local addresses. Each refusal is a ``BadInputError`` (422)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import SecretStr

from api.callbacks import check_callback
from api.deps import Services
from shared.errors import BadInputError

PUBLIC = "http://93.184.215.14/hook"  # resolved by the guard, never called here


def checked(settings, url: object) -> str | None:
    async def main() -> str | None:
        s = Services.build(settings)
        try:
            return await check_callback(s, url)
        finally:
            await s.aclose()

    return asyncio.run(main())


@pytest.fixture
def signed(inproc_settings):
    return inproc_settings.model_copy(update={"webhook_secret": SecretStr("s" * 32)})


def test_none_or_empty_is_no_callback(inproc_settings):
    assert checked(inproc_settings, None) is None
    assert checked(inproc_settings, "") is None


def test_a_public_http_url_is_kept(signed):
    assert checked(signed, PUBLIC) == PUBLIC
    assert checked(signed, "https://93.184.215.14:8443/a?b=c") == "https://93.184.215.14:8443/a?b=c"


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("ftp://93.184.215.14/hook", "http(s) URL"),
        (5, "http(s) URL"),
        ("http://[::1/hook", "http(s) URL"),
        ("http:///hook", "no host"),
        ("http://93.184.215.14/" + "a" * 2048, "longer than 2048"),
        ("http://127.0.0.1:9/hook", "private or local"),
        ("http://10.0.0.7/hook", "private or local"),
        ("http://169.254.169.254/latest/meta-data", "private or local"),
    ],
)
def test_refused_urls(signed, url, words):
    with pytest.raises(BadInputError) as refused:
        checked(signed, url)
    assert words in refused.value.detail
    assert type(refused.value) is BadInputError  # 422, not the image URL's 400


def test_no_signing_secret_refuses_every_callback(inproc_settings):
    assert inproc_settings.webhook_secret is None
    with pytest.raises(BadInputError) as refused:
        checked(inproc_settings, PUBLIC)
    assert "OFA_WEBHOOK_SECRET" in refused.value.detail
