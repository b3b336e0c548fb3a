"""What ``api/openapi.py`` adds to the OpenAPI document: request bodies the routes read
themselves, responses, and links. Checked on the document the app serves: every
reference resolves, no ``$defs`` (ReDoc refuses them), every link names an operation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import openapi
from api.app import create_app
from api.schemas import BatchRequest


@pytest.fixture(scope="module")
def spec(inproc_settings) -> Iterator[dict[str, Any]]:
    with TestClient(create_app(inproc_settings)) as client:
        yield client.get("/openapi.json").json()


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def test_inline_defs_writes_each_definition_in_place():
    schema = BatchRequest.model_json_schema()
    assert "$defs" in schema  # what pydantic gives
    inlined = openapi.inline_defs(schema)
    assert not any(k == "$defs" for k, _ in walk(inlined))
    assert not any(k == "$ref" for k, _ in walk(inlined))
    item = inlined["properties"]["items"]["items"]
    assert set(item["required"]) == {"text"} and "image_url" in item["properties"]


def test_every_reference_resolves_and_no_defs_remain(spec):
    schemas = spec["components"]["schemas"]
    refs = [v for k, v in walk(spec) if k == "$ref"]
    assert refs
    for ref in refs:
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.removeprefix("#/components/schemas/") in schemas, ref
    assert not any(k == "$defs" for k, _ in walk(spec))


def test_every_link_names_an_operation_of_the_document(spec):
    operation_ids = {op["operationId"] for item in spec["paths"].values() for op in item.values()}
    links = [link for k, v in walk(spec) if k == "links" for link in v.values()]
    assert len(links) == 6  # GetJob, and five from a started scan (with its changes)
    for link in links:
        assert link["operationId"] in operation_ids


def test_the_bodies_the_routes_read_themselves(spec):
    paths = spec["paths"]
    for path, kinds in (
        ("/v1/jobs", {"multipart/form-data", "application/json"}),
        ("/v1/jobs/batch", {"multipart/form-data", "application/json"}),
        ("/v1/scans", {"multipart/form-data", "application/json"}),
    ):
        body = paths[path]["post"]["requestBody"]
        assert body["required"] is True and set(body["content"]) == kinds, path
    job = paths["/v1/jobs"]["post"]
    form = openapi.POST_JOB_BODY["requestBody"]["content"]["multipart/form-data"]
    assert job["requestBody"]["content"]["multipart/form-data"] == form
    assert {"200", "202", "400", "401", "403", "413", "415", "422", "429", "503"} <= set(
        job["responses"]
    )
    assert job["responses"]["202"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JobAccepted"
    }
    report = paths["/v1/scans/{scan_id}/report"]["get"]["responses"]["200"]["content"]
    assert {"application/json", "text/html"} <= set(report)
    results = paths["/v1/scans/{scan_id}/results"]["get"]["responses"]["200"]["content"]
    assert {"application/x-ndjson", "text/csv"} <= set(results)
    for item in paths.values():
        for op in item.values():
            if {"jobs", "scans"} & set(op["tags"]):
                assert {"401", "403", "422", "429", "503"} <= set(op["responses"])


def test_the_job_routes_and_both_request_bodies_are_documented(spec):
    assert "/v1/jobs" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    body = spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
