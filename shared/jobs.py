"""The job record: one Redis hash per job in the durable store.

Pure encoding and decoding here; the API (async Redis) and the worker (sync Redis)
each do their own I/O with these helpers.
"""

from __future__ import annotations

import json
import time
from typing import Any

from shared.schemas import Job, Verdict


def new_record(
    key: str, model_id: str, revision: str, text: str, premise: str | None
) -> dict[Any, Any]:
    """Fields of a freshly queued job."""
    record = {
        "status": "queued",
        "key": key,
        "model": model_id,
        "revision": revision,
        "text": text,
        "created_at": f"{time.time():.6f}",
    }
    if premise is not None:
        record["premise"] = premise
    return record


def running_fields() -> dict[Any, Any]:
    """Fields written when a worker starts the job."""
    return {"status": "running", "started_at": f"{time.time():.6f}"}


def succeeded_fields(verdict: dict[str, Any], cached: bool) -> dict[Any, Any]:
    """Fields written when the verdict is known."""
    return {
        "status": "succeeded",
        "verdict": json.dumps(verdict),
        "cached": "1" if cached else "0",
        "finished_at": f"{time.time():.6f}",
    }


def failed_fields(error: str) -> dict[Any, Any]:
    """Fields written when the job cannot succeed."""
    return {"status": "failed", "error": error, "finished_at": f"{time.time():.6f}"}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def decode(job_id: str, raw: dict[Any, Any]) -> Job:
    """A Redis hash (bytes or str) -> the API's ``Job``."""
    fields = {_text(k): _text(v) for k, v in raw.items()}

    def num(name: str) -> float | None:
        value = fields.get(name)
        return float(value) if value else None

    verdict = fields.get("verdict")
    return Job(
        job_id=job_id,
        status=fields.get("status") or "queued",
        cached=fields.get("cached") == "1",
        created_at=num("created_at"),
        started_at=num("started_at"),
        finished_at=num("finished_at"),
        verdict=Verdict.model_validate_json(verdict) if verdict else None,
        error=fields.get("error"),
    )
