"""The pages a person opens (``api/docs.py``): the web page at ``/`` and its assets,
and Swagger UI and ReDoc served from vendored assets (no CDN), none of them in the
OpenAPI document."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.docs import STATIC


@pytest.fixture
def api(inproc_settings) -> Iterator[TestClient]:
    with TestClient(create_app(inproc_settings)) as client:  # no key: these are public
        yield client


def test_the_page_and_every_asset_it_names_are_served(api):
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.content == (STATIC / "index.html").read_bytes()
    refs = re.findall(r'(?:src|href)="(/[^"]+)"', page.text)
    assert "/static/app.css" in refs and "/static/app.js" in refs
    for ref in refs:
        asset = api.get(ref)
        assert asset.status_code == 200, ref
    assert api.get("/static/nothing.js").status_code == 404


def test_swagger_ui_keeps_the_key_and_asks_no_validator(api):
    html = api.get("/docs").text
    assert "/openapi.json" in html and "ofa-entail: API docs" in html
    assert '"persistAuthorization": true' in html
    assert '"validatorUrl": null' in html
    assert "oauth2-redirect" not in html


def test_redoc_fetches_no_fonts(api):
    html = api.get("/redoc").text
    assert "/openapi.json" in html and "ofa-entail: API reference" in html
    assert "fonts.googleapis" not in html
    assert "/static/vendor/redoc/redoc.standalone.js" in html


def test_the_pages_are_not_operations_of_the_api(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert not {"/", "/docs", "/redoc"} & set(paths)
    assert not any(p.startswith("/static") for p in paths)
