"""Property-based conformance of the running API to its own OpenAPI document
(schemathesis, its command line): for every operation, no 5xx and no status code,
content type or body the document does not describe. Bounded by examples and time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import API_KEY

EXAMPLES = 30


@pytest.mark.slow
def test_api_conforms_to_its_openapi_document(api: str, worker, coordinator, tmp_path: Path):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{api}/openapi.json",
            "--header",
            f"Authorization: Bearer {API_KEY}",
            "--checks",
            "all",
            "--max-examples",
            str(EXAMPLES),
            "--request-timeout",
            "30",
            "--seed",
            "1",
            "--generation-deterministic",
            "--continue-on-failure",
            # Requests the schema allows but the service refuses on purpose (an empty
            # text, a non-image file) are documented 4xx, not failures to conform; and a
            # multipart field is a string on the wire whatever the generator meant (an
            # "integer" text arrives as the text "305"), so accepting it is right.
            # DELETE /v1/jobs/{id} cancels: the job stays readable afterwards on purpose
            # (failed "cancelled", or, running or finished, "unchanged" with its
            # verdict), which use_after_free reads as a resource deleted yet served.
            "--exclude-checks",
            "positive_data_acceptance,negative_data_rejection,use_after_free",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-3000:]
