"""A real S3-compatible server for the object-storage tests: moto's standalone server
(``moto[server]`` from PyPI), run as a subprocess on a free port.

Why moto: it is one ``pip install`` (no container runtime, no Java or Go binary to
fetch), speaks S3's REST protocol over HTTP as AWS does (ETags, conditional GETs,
ranges, multipart uploads, listings), and accepts any credentials, so the code under
test signs its requests exactly as against AWS. MinIO would be as real but is a
separate binary; moto's in-process mocks would bypass the HTTP client under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.helpers import free_port

# What the code under test is given as its credential chain (moto takes any).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
}


class MotoServer:
    """``moto_server`` on 127.0.0.1: ``endpoint`` for ``OFA_S3_ENDPOINT_URL``,
    ``create_bucket`` over plain HTTP."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        # Where moto's request recorder appends (by default a file in the current
        # directory: the repository's root when tests run).
        self.recording_path = log_path.with_name("recording.jsonl")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it answers."""
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child writes to it)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_RECORDER_FILEPATH": str(self.recording_path)},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log_path.read_text()[-2000:]}")
            try:
                httpx.get(f"{self.endpoint}/moto-api/", timeout=1)
                return
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server did not answer within {timeout} s")

    def create_bucket(self, name: str) -> None:
        """Create a bucket (moto needs no signature for this)."""
        response = httpx.put(f"{self.endpoint}/{name}", timeout=10)
        response.raise_for_status()

    def record(self, on: bool) -> None:
        """Start (from an empty recording) or stop recording the requests the server
        is sent (moto's recorder: method, URL and headers of each, the body too)."""
        if on:
            httpx.post(f"{self.endpoint}/moto-api/recorder/reset-recording", timeout=10)
        which = "start" if on else "stop"
        httpx.post(f"{self.endpoint}/moto-api/recorder/{which}-recording", timeout=10)

    def recorded(self, method: str, path: str) -> list[dict]:
        """The requests recorded so far with this method to this path (``/bucket/key``,
        the query left out), oldest first, each with its lower-cased ``headers``."""
        text = httpx.get(f"{self.endpoint}/moto-api/recorder/download-recording", timeout=10).text
        found = []
        for line in text.splitlines():
            entry = json.loads(line)
            url = entry["url"].split("?", 1)[0]
            if entry["method"] == method and url.endswith(path):
                entry["headers"] = {k.lower(): v for k, v in entry["headers"].items()}
                found.append(entry)
        return found

    def stop(self) -> None:
        """Stop the server."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
