"""A Python client for the service, sync (``Client``) and async (``AsyncClient``), on httpx.

    from ofa_entail_client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as ofa:
        result = ofa.check("photo.jpg", "There is a cup of coffee on the table.")
        print(result.verdict.label, result.verdict.probabilities, result.cached)

Results are typed models (``ofa_entail_client.models``); every refusal raises
``ApiError`` carrying the problem detail; a failed job raises ``JobFailed``; a job
that does not finish in time raises ``WaitTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from .models import Job, JobStatus, ScanChange, ScanReport, ScanSummary, Verdict

ImageInput = bytes | str | Path  # bytes, a file path, or an http(s) URL
Progress = Callable[[ScanSummary], None]
SERVER_WAIT_S = 20.0  # one `?wait=` request holds at most this long (the server caps it too)


class ClientError(Exception):
    """Base class of the client's errors."""


class ApiError(ClientError):
    """The service refused a request; carries its problem detail (RFC 9457)."""

    def __init__(self, status: int, title: str, detail: str, type_: str = "") -> None:
        self.status, self.title, self.detail, self.type = status, title, detail, type_
        super().__init__(f"HTTP {status} {title}: {detail}")

    @classmethod
    def from_response(cls, response: httpx.Response) -> ApiError:
        """Build from a problem+json response (or whatever body came back)."""
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        return cls(
            response.status_code,
            str(body.get("title") or response.reason_phrase),
            str(body.get("detail") or response.text[:500]),
            str(body.get("type") or ""),
        )


class JobFailed(ClientError):
    """The job ended failed; ``job.error`` says why."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(f"job {job.job_id} failed: {job.error}")


class WaitTimeout(ClientError):
    """The job had not finished when the wait ran out."""

    def __init__(self, job: Job, seconds: float) -> None:
        self.job = job
        super().__init__(f"job {job.job_id} still {job.status} after {seconds:g}s")


@dataclass(frozen=True)
class Submitted:
    """What ``submit`` got: a cached verdict at once, or a job to wait for."""

    job_id: str | None
    verdict: Verdict | None = None

    @property
    def cached(self) -> bool:
        """True when the service answered from its cache."""
        return self.verdict is not None and self.job_id is None


@dataclass(frozen=True)
class CheckResult:
    """A verdict, whether it came from the cache, and how long the check took."""

    verdict: Verdict
    cached: bool
    job_id: str | None
    seconds: float


def _job_request(image: ImageInput, text: str, premise: str | None) -> dict[str, Any]:
    """httpx keyword arguments for ``POST /v1/jobs``: JSON for a URL, multipart otherwise."""
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        body: dict[str, Any] = {"text": text, "image_url": image}
        if premise is not None:
            body["premise"] = premise
        return {"json": body}
    if isinstance(image, bytes):
        data, name = image, "image"
    else:
        path = Path(image)
        data, name = path.read_bytes(), path.name
    form = {"text": text} | ({"premise": premise} if premise is not None else {})
    return {"data": form, "files": {"image": (name, data)}}


def _submitted(response: httpx.Response) -> Submitted | Job:
    if response.status_code >= 400:
        raise ApiError.from_response(response)
    doc = response.json()
    if response.status_code == 202:
        return Submitted(job_id=doc["job_id"])
    if "job_id" in doc:  # ?wait= answered with the finished job
        return Job.model_validate(doc)
    return Submitted(job_id=None, verdict=Verdict.model_validate(doc["verdict"]))


def _job(response: httpx.Response) -> Job:
    if response.status_code >= 400:
        raise ApiError.from_response(response)
    return Job.model_validate(response.json())


def _finished(job: Job) -> Job:
    if job.status == JobStatus.FAILED:
        raise JobFailed(job)
    return job


def _scan_request(
    manifest: str | Path | None,
    callback_url: str | None,
    fmt: str | None,
    catalogue: str | None,
    manifest_url: str | None,
    results_url: str | None,
    results_format: str | None,
) -> dict[str, Any]:
    """httpx keyword arguments for ``POST /v1/scans``: JSON naming an object URL, or a
    multipart upload (``files`` holds the manifest's path, opened by the caller)."""
    fields = {
        "callback_url": callback_url,
        "format": fmt,
        "catalogue": catalogue,
        "results_url": results_url,
        "results_format": results_format,
    }
    given = {k: v for k, v in fields.items() if v}
    if manifest_url is not None:
        if manifest is not None:
            raise ValueError("give a manifest file or a manifest_url, not both")
        return {"json": {"manifest_url": manifest_url, **given}}
    if manifest is None:
        raise ValueError("give a manifest file or a manifest_url")
    return {"data": given, "files": {"manifest": Path(manifest)}}


def _changes(chunks: Iterator[bytes]) -> Iterator[ScanChange]:
    """``ScanChange`` models from a JSONL stream's chunks."""
    rest = b""
    for chunk in chunks:
        *lines, rest = (rest + chunk).split(b"\n")
        for line in lines:
            if line.strip():
                yield ScanChange.model_validate_json(line)
    if rest.strip():
        yield ScanChange.model_validate_json(rest)


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"}


class Client:
    """Blocking client. Use as a context manager, or call ``close``."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0, **httpx_kwargs: Any):
        self.http = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers=_headers(api_key),
            timeout=timeout,
            **httpx_kwargs,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    # -- jobs --------------------------------------------------------------------------

    def submit(self, image: ImageInput, text: str, premise: str | None = None) -> Submitted:
        """Submit one image and sentence: a cached verdict, or a job id to ``wait`` for."""
        got = _submitted(self.http.post("/v1/jobs", **_job_request(image, text, premise)))
        assert isinstance(got, Submitted)
        return got

    def job(self, job_id: str) -> Job:
        """The job as it stands."""
        return _job(self.http.get(f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, timeout: float = 120.0, poll_s: float = 0.2) -> Job:
        """The finished job; ``JobFailed`` if it failed, ``WaitTimeout`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.status.finished:
                return _finished(job)
            if time.monotonic() >= deadline:
                raise WaitTimeout(job, timeout)
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    def check(
        self, image: ImageInput, text: str, premise: str | None = None, timeout: float = 120.0
    ) -> CheckResult:
        """Submit and wait: the verdict, whether it was cached, and how long it took."""
        start = time.monotonic()
        wait_s = min(timeout, SERVER_WAIT_S)
        got = _submitted(
            self.http.post(
                "/v1/jobs", params={"wait": wait_s}, **_job_request(image, text, premise)
            )
        )
        if isinstance(got, Submitted) and got.verdict is not None:
            return CheckResult(got.verdict, True, None, time.monotonic() - start)
        if isinstance(got, Job):
            job = _finished(got)
        else:
            assert got.job_id is not None
            job = self.wait(got.job_id, timeout - (time.monotonic() - start))
        assert job.verdict is not None
        return CheckResult(job.verdict, job.cached, job.job_id, time.monotonic() - start)

    # -- scans -------------------------------------------------------------------------

    def start_scan(
        self,
        manifest: str | Path | None = None,
        callback_url: str | None = None,
        fmt: str | None = None,
        *,
        catalogue: str | None = None,
        idempotency_key: str | None = None,
        manifest_url: str | None = None,
        results_url: str | None = None,
        results_format: str | None = None,
    ) -> ScanSummary:
        """Start a scan of a manifest file (JSONL or CSV, uploaded) or of an object URL
        (``manifest_url``: s3://, gs://, az://). ``catalogue``: its changes since the
        catalogue's previous succeeded scan are counted; ``idempotency_key``: a start
        repeated with the same key and arguments within a day returns the first one's
        scan. ``results_url`` (+ ``results_format``): where the server writes the results."""
        request = _scan_request(
            manifest, callback_url, fmt, catalogue, manifest_url, results_url, results_format
        )
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with contextlib.ExitStack() as stack:
            if "files" in request:
                path = request["files"]["manifest"]
                fh = stack.enter_context(path.open("rb"))
                request["files"] = {"manifest": (path.name, fh)}
            response = self.http.post("/v1/scans", headers=headers, **request)
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return self.scan_status(response.json()["scan_id"])

    def scan_status(self, scan_id: str) -> ScanSummary:
        """A scan's progress."""
        response = self.http.get(f"/v1/scans/{scan_id}")
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return ScanSummary.model_validate(response.json())

    def scan(
        self,
        manifest: str | Path | None = None,
        on_progress: Progress | None = None,
        poll_s: float = 0.5,
        callback_url: str | None = None,
        **start: Any,
    ) -> ScanSummary:
        """Run a scan to its end, calling ``on_progress`` with each summary polled
        (``start``: ``start_scan``'s keyword arguments)."""
        summary = self.start_scan(manifest, callback_url, **start)
        return self.follow_scan(summary, on_progress, poll_s)

    def follow_scan(
        self,
        summary: ScanSummary,
        on_progress: Progress | None = None,
        poll_s: float = 0.5,
        timeout: float | None = None,
    ) -> ScanSummary:
        """Poll a started scan until it ends (or ``timeout`` seconds pass: the summary
        as it then stands, unfinished)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if on_progress is not None:
                on_progress(summary)
            if summary.status.finished and summary.pending == 0:
                return summary
            if deadline is not None and time.monotonic() >= deadline:
                return summary
            time.sleep(poll_s)
            summary = self.scan_status(summary.scan_id)

    def scan_changes(
        self, scan_id: str, fmt: str = "jsonl", out: IO[bytes] | None = None
    ) -> Iterator[bytes]:
        """A catalogue scan's changes since the catalogue's previous succeeded scan
        (JSONL lines of ``ScanChange``, or CSV), streamed (written to ``out`` too)."""
        with self.http.stream(
            "GET", f"/v1/scans/{scan_id}/changes", params={"format": fmt}
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError.from_response(response)
            for chunk in response.iter_bytes():
                if out is not None:
                    out.write(chunk)
                yield chunk

    def iter_changes(self, scan_id: str) -> Iterator[ScanChange]:
        """The same changes, one ``ScanChange`` at a time."""
        yield from _changes(self.scan_changes(scan_id))

    def scan_report(self, scan_id: str) -> ScanReport:
        """Accuracy, confusion matrix and precision/recall over rows with a gold label."""
        response = self.http.get(f"/v1/scans/{scan_id}/report")
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return ScanReport.model_validate(response.json())

    def scan_report_html(self, scan_id: str) -> str:
        """The same report as a self-contained HTML page."""
        response = self.http.get(f"/v1/scans/{scan_id}/report", params={"format": "html"})
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response.text

    def scan_results(
        self, scan_id: str, fmt: str = "jsonl", out: IO[bytes] | None = None
    ) -> Iterator[bytes]:
        """The results file's bytes, streamed (written to ``out`` too when given)."""
        with self.http.stream(
            "GET", f"/v1/scans/{scan_id}/results", params={"format": fmt}
        ) as response:
            if response.status_code >= 400:
                response.read()
                raise ApiError.from_response(response)
            for chunk in response.iter_bytes():
                if out is not None:
                    out.write(chunk)
                yield chunk


class AsyncClient:
    """The same calls for asyncio code."""

    def __init__(self, base_url: str, api_key: str, timeout: float = 60.0, **httpx_kwargs: Any):
        self.http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=_headers(api_key),
            timeout=timeout,
            **httpx_kwargs,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections."""
        await self.http.aclose()

    async def submit(self, image: ImageInput, text: str, premise: str | None = None) -> Submitted:
        """Submit one image and sentence: a cached verdict, or a job id to ``wait`` for."""
        response = await self.http.post("/v1/jobs", **_job_request(image, text, premise))
        got = _submitted(response)
        assert isinstance(got, Submitted)
        return got

    async def job(self, job_id: str) -> Job:
        """The job as it stands."""
        return _job(await self.http.get(f"/v1/jobs/{job_id}"))

    async def wait(self, job_id: str, timeout: float = 120.0, poll_s: float = 0.2) -> Job:
        """The finished job; ``JobFailed`` if it failed, ``WaitTimeout`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            job = await self.job(job_id)
            if job.status.finished:
                return _finished(job)
            if time.monotonic() >= deadline:
                raise WaitTimeout(job, timeout)
            await asyncio.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))

    async def check(
        self, image: ImageInput, text: str, premise: str | None = None, timeout: float = 120.0
    ) -> CheckResult:
        """Submit and wait: the verdict, whether it was cached, and how long it took."""
        start = time.monotonic()
        wait_s = min(timeout, SERVER_WAIT_S)
        response = await self.http.post(
            "/v1/jobs", params={"wait": wait_s}, **_job_request(image, text, premise)
        )
        got = _submitted(response)
        if isinstance(got, Submitted) and got.verdict is not None:
            return CheckResult(got.verdict, True, None, time.monotonic() - start)
        if isinstance(got, Job):
            job = _finished(got)
        else:
            assert got.job_id is not None
            job = await self.wait(got.job_id, timeout - (time.monotonic() - start))
        assert job.verdict is not None
        return CheckResult(job.verdict, job.cached, job.job_id, time.monotonic() - start)

    async def start_scan(
        self,
        manifest: str | Path | None = None,
        callback_url: str | None = None,
        fmt: str | None = None,
        *,
        catalogue: str | None = None,
        idempotency_key: str | None = None,
        manifest_url: str | None = None,
        results_url: str | None = None,
        results_format: str | None = None,
    ) -> ScanSummary:
        """Start a scan of a manifest file or of an object URL (``Client.start_scan``)."""
        request = _scan_request(
            manifest, callback_url, fmt, catalogue, manifest_url, results_url, results_format
        )
        if "files" in request:
            path = request["files"]["manifest"]
            request["files"] = {"manifest": (path.name, path.read_bytes())}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        response = await self.http.post("/v1/scans", headers=headers, **request)
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return await self.scan_status(response.json()["scan_id"])

    async def scan_status(self, scan_id: str) -> ScanSummary:
        """A scan's progress."""
        response = await self.http.get(f"/v1/scans/{scan_id}")
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return ScanSummary.model_validate(response.json())

    async def scan(
        self,
        manifest: str | Path | None = None,
        on_progress: Progress | None = None,
        poll_s: float = 0.5,
        callback_url: str | None = None,
        **start: Any,
    ) -> ScanSummary:
        """Run a scan to its end, calling ``on_progress`` with each summary polled
        (``start``: ``start_scan``'s keyword arguments)."""
        summary = await self.start_scan(manifest, callback_url, **start)
        while True:
            if on_progress is not None:
                on_progress(summary)
            if summary.status.finished and summary.pending == 0:
                return summary
            await asyncio.sleep(poll_s)
            summary = await self.scan_status(summary.scan_id)

    async def scan_changes(self, scan_id: str, fmt: str = "jsonl") -> bytes:
        """A catalogue scan's changes since the catalogue's previous succeeded scan
        (JSONL lines of ``ScanChange``, or CSV)."""
        response = await self.http.get(f"/v1/scans/{scan_id}/changes", params={"format": fmt})
        if response.status_code >= 400:
            raise ApiError.from_response(response)
        return response.content

    async def iter_changes(self, scan_id: str) -> list[ScanChange]:
        """The same changes as ``ScanChange`` models."""
        return list(_changes(iter([await self.scan_changes(scan_id)])))
