"""Every refusal as RFC 9457 ``application/problem+json`` (``api/problems.py``): the
status table, the refusals' headers and metrics, the handlers for FastAPI's own errors
(422, 404, 405), and what ``install`` adds to the OpenAPI
document."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from api import metrics
from api.app import create_app
from api.deps import RateLimitedError
from api.problems import (
    REFUSALS,
    STATUS_OF,
    TYPE_BASE,
    documented,
    problem_body,
    refusal,
    status_of,
)
from shared import errors
from shared.store.limits import Decision
from tests.helpers import API_KEY

pytestmark = pytest.mark.usefixtures("clean_inproc")


@pytest.fixture
def api(inproc_settings) -> Iterator[TestClient]:
    with TestClient(create_app(inproc_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def sample(name: str) -> float:
    return metrics.REGISTRY.get_sample_value(name) or 0.0


def rejected(slug: str) -> float:
    return metrics.REGISTRY.get_sample_value("ofa_inputs_rejected_total", {"type": slug}) or 0.0


@pytest.mark.parametrize(
    ("exc", "status", "slug"),
    [
        (errors.BadInputError("x"), 422, "invalid-input"),
        (errors.BadImageError("x"), 400, "bad-image"),
        (errors.UnsupportedImageError("x"), 415, "unsupported-image"),
        (errors.ImageTooLargeError("x"), 413, "image-too-large"),
        (errors.BadTextError("x"), 422, "bad-text"),
        (errors.ImageUrlError("x"), 400, "bad-image-url"),
        (errors.UnsupportedMediaTypeError("x"), 415, "unsupported-media-type"),
        (errors.PayloadTooLargeError("x"), 413, "payload-too-large"),
        (errors.ManifestError("x"), 400, "bad-manifest"),
        (errors.ManifestLineTooLongError("x"), 413, "manifest-line-too-long"),
    ],
)
def test_each_bad_input_has_its_status_and_type(exc, status, slug):
    assert status_of(exc) == (status, slug)
    before = rejected(slug)
    got_status, body, headers = refusal(exc)
    assert (got_status, headers) == (status, None)
    assert body == {"type": TYPE_BASE + slug, "title": exc.title, "status": status, "detail": "x"}
    assert rejected(slug) == before + 1


def test_an_unlisted_subclass_takes_its_nearest_listed_ancestors_entry():
    class OddImage(errors.BadImageError):
        pass

    class Odder(OddImage):
        pass

    assert OddImage not in STATUS_OF
    assert status_of(Odder("x")) == STATUS_OF[errors.BadImageError]


def test_the_other_refusals_carry_retry_after():
    refused = Decision(
        admitted=False, limit=5, remaining=0, retry_after_s=2.2, reset_s=12, window_s=60
    )
    limited = sample("ofa_requests_rate_limited_total")
    status, body, headers = refusal(RateLimitedError(refused, "new jobs"))
    assert status == 429 and body["type"] == TYPE_BASE + "rate-limited"
    assert headers == {
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "12",
        "RateLimit-Policy": "5;w=60",
        "Retry-After": "3",
    }
    assert "retry in 3s" in body["detail"]
    assert sample("ofa_requests_rate_limited_total") == limited + 1

    shed = sample("ofa_jobs_shed_total")
    status, body, headers = refusal(errors.OverloadedError(9, 8, retry_after_s=5))
    assert (status, headers) == (503, {"Retry-After": "5"})
    assert body["type"].endswith("/overloaded") and body["title"] == "Overloaded"
    assert sample("ofa_jobs_shed_total") == shed + 1

    status, body, headers = refusal(errors.QueueUnavailableError("down"))
    assert (status, headers) == (503, {"Retry-After": "5"})
    assert body["type"].endswith("/unavailable") and body["detail"] == "down"


def test_every_refusal_kind_is_handled():
    for kind in REFUSALS:
        assert issubclass(kind, Exception)
    with pytest.raises(KeyError):
        refusal(KeyError("not a refusal"))  # anything else is raised again


def test_documented_entries_name_the_problem_schema():
    doc = documented(404, 429)
    assert set(doc) == {404, 429}
    for entry in doc.values():
        assert entry["description"]
        assert entry["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}
        }
    assert problem_body(418, "t", "d", "teapot")["type"] == TYPE_BASE + "teapot"


def test_an_invalid_parameter_is_a_422_problem(api):
    resp = api.post("/v1/jobs?wait=-1", data={"text": "a"}, files={"image": ("a.jpg", b"x")})
    assert resp.status_code == 422
    assert resp.headers["content-type"] == "application/problem+json"
    doc = resp.json()
    assert doc["type"] == TYPE_BASE + "invalid-request" and doc["title"] == "Invalid request"
    assert doc["detail"].startswith("query.wait:")


def test_http_errors_are_problems(api):
    missing = api.get("/v1/jobs/nope")
    assert missing.status_code == 404 and missing.json()["type"] == TYPE_BASE + "not-found"
    assert missing.headers["content-type"] == "application/problem+json"
    put = api.put("/v1/jobs/nope")
    assert put.status_code == 405 and put.json()["title"] == "Method not allowed"
    assert put.headers["content-type"] == "application/problem+json"
    assert put.headers["allow"] == "DELETE, GET"  # the methods /v1/jobs/{job_id} takes
    unknown = api.get("/no/such/path")
    assert unknown.status_code == 404 and unknown.json()["title"] == "Not found"


def test_a_405_allows_what_the_most_specific_path_takes(api):
    """``/v1/jobs/batch`` also matches ``/v1/jobs/{job_id}``: Allow names the batch
    route's own method, as the document does, not the job route's (a bug: FastAPI's
    included routers carry no methods, so every Allow header came back empty)."""
    assert api.put("/v1/jobs/batch").headers["allow"] == "POST"
    assert api.patch("/v1/jobs").headers["allow"] == "POST"
    assert api.post("/v1/scans/x/results").headers["allow"] == "GET"
    assert api.post("/docs").headers["allow"] == "GET"


def test_install_adds_the_referenced_schemas_and_the_security_schemes(api):
    spec = api.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert set(schemas["Problem"]["required"]) == {"type", "title", "status", "detail"}
    assert "CachedVerdict" in schemas and "Verdict" in schemas  # its $defs, hoisted
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    for path, item in spec["paths"].items():
        for op in item.values():
            secured = "security" in op
            assert secured == bool({"jobs", "scans"} & set(op.get("tags", ()))), path
