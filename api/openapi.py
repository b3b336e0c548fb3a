"""What the OpenAPI document says of each operation beyond its signature: request bodies
the routes read themselves (multipart or JSON), the responses they may give, and the
links between operations. The routes name these; nothing here runs per request."""

from __future__ import annotations

from typing import Any

from api.problems import documented
from api.schemas import BatchRequest, JobAccepted, JobRequest

# --- shared by every operation of a router ----------------------------------------------

# Refusals any jobs or scans operation may give before its own work: the key, the
# request's shape, the rate limit, shedding or a store that is down.
ROUTER_ERRORS = documented(401, 403, 422, 429, 503)
# Refusals of an operation that reads a body.
BODY_ERRORS = documented(400, 413, 415)
NOT_FOUND = documented(404)


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A pydantic JSON schema with its ``$defs`` written in place of their references:
    an OpenAPI document has no ``#/$defs/...`` (ReDoc refuses the whole document with
    "Invalid reference token: $defs"; Swagger UI happens to resolve them)."""
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


# --- POST /v1/jobs ----------------------------------------------------------------------

POST_JOB_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image", "text"],
                    "properties": {
                        "image": {"type": "string", "format": "binary"},
                        "text": {"type": "string"},
                        "premise": {"type": "string"},
                        # An empty example: Swagger UI's "Try it out" would otherwise
                        # fill in "string", which is no URL.
                        "callback_url": {"type": "string", "format": "uri", "example": ""},
                    },
                }
            },
            "application/json": {"schema": JobRequest.model_json_schema()},
        },
    }
}

POST_JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the verdict: from the cache (a CachedVerdict) at once, or, with "
        "?wait=, the finished job (a Job) once it ended within the wait",
        "content": {
            "application/json": {
                "schema": {
                    "anyOf": [
                        {"$ref": "#/components/schemas/CachedVerdict"},
                        {"$ref": "#/components/schemas/Job"},
                    ]
                }
            }
        },
    },
    202: {
        "model": JobAccepted,
        "description": "queued: poll Location",
        "links": {
            "GetJob": {
                "operationId": "get_job_v1_jobs__job_id__get",
                "parameters": {"job_id": "$response.body#/job_id"},
            }
        },
    },
    **BODY_ERRORS,
}

# --- POST /v1/jobs/batch ----------------------------------------------------------------

POST_BATCH_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": inline_defs(BatchRequest.model_json_schema())},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "description": "item i: a file image_i, text_i, optional premise_i and "
                    "callback_url_i (i = 0, 1, ...)",
                    "required": ["image_0", "text_0"],
                    "properties": {
                        "image_0": {"type": "string", "format": "binary"},
                        "text_0": {"type": "string"},
                        "premise_0": {"type": "string"},
                        "callback_url_0": {"type": "string"},
                    },
                }
            },
        },
    }
}

# --- POST /v1/scans and the scan's reads ------------------------------------------------

POST_SCAN_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["manifest"],
                    "properties": {
                        "manifest": {
                            "type": "string",
                            "format": "binary",
                            "description": "JSONL or CSV (id, image, text, premise, sha256)",
                        },
                        "format": {"type": "string", "enum": ["jsonl", "csv"]},
                        "callback_url": {"type": "string"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "a manifest's 'path' or its 'manifest_url'",
                    "anyOf": [{"required": ["path"]}, {"required": ["manifest_url"]}],
                    "properties": {
                        "path": {
                            "type": "string",
                            "description": "a manifest under OFA_MANIFEST_ROOT",
                        },
                        "manifest_url": {
                            "type": "string",
                            "description": "a JSONL manifest in object storage (s3://, gs://, "
                            "az://), within the key's buckets; streamed by the coordinator",
                        },
                        "results_url": {
                            "type": "string",
                            "description": "an object URL the results are written to when "
                            "the scan ends",
                        },
                        "results_format": {
                            "type": "string",
                            "enum": ["jsonl", "csv", "parquet"],
                            "description": "default: from results_url's suffix, else jsonl",
                        },
                        "format": {"type": "string", "enum": ["jsonl", "csv"]},
                        "callback_url": {"type": "string"},
                    },
                }
            },
        },
    }
}

POST_SCAN_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {
        "description": "stored and queued: follow Location",
        "links": {
            op: {"operationId": op_id, "parameters": {"scan_id": "$response.body#/scan_id"}}
            for op, op_id in (
                ("GetScan", "get_scan_v1_scans__scan_id__get"),
                ("GetScanResults", "get_scan_results_v1_scans__scan_id__results_get"),
                ("GetScanReport", "get_scan_report_v1_scans__scan_id__report_get"),
                ("CancelScan", "delete_scan_v1_scans__scan_id__delete"),
            )
        },
    },
    **BODY_ERRORS,
}

SCAN_RESULTS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "one line per manifest row read so far",
        "content": {
            "application/x-ndjson": {"schema": {"type": "string"}},
            "text/csv": {"schema": {"type": "string"}},
        },
    },
    **NOT_FOUND,
}

SCAN_REPORT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {"schema": {"type": "string"}}}},
    **NOT_FOUND,
}
