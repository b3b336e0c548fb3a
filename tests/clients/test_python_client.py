"""The Python client's own tests (clients/python/tests) against a real service: the
session's uvicorn API, worker and scan coordinator, in a pytest of their own."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import API_KEY

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"


def test_the_client_tests_pass_against_the_service(api, worker, coordinator):
    env = dict(os.environ, OFA_TEST_URL=api, OFA_TEST_API_KEY=API_KEY)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=CLIENT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    # Every test ran and passed: none skipped for a missing service, none left out.
    written = sum(
        len(re.findall(r"^(?:async )?def test_", f.read_text(), re.M))
        for f in (CLIENT / "tests").glob("test_*.py")
    )
    passed = re.match(r"(\d+) passed in ", output.strip().splitlines()[-1])
    assert passed and int(passed[1]) >= written, output
