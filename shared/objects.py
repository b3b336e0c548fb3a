"""Object URLs (``s3://``, ``gs://``, ``az://``) and the one client that reads and writes
them, on obstore (Rust's ``object_store``): S3, S3-compatible endpoints, GCS and Azure.

- ``ObjectUrl`` parses and names an object (or, for listing, a prefix).
- ``BucketPolicy`` says which buckets (and key prefixes) a request may name: the global
  allow-list ``OFA_OBJECT_BUCKETS``, narrowed by a per-key list where the key has one.
  Empty allows nothing, so object URLs are off until configured.
- ``ObjectStorage`` holds one obstore store per (scheme, bucket), built on first use
  with credentials from each cloud's standard chain (environment variables, the
  web-identity token file, the instance or workload-identity metadata endpoints), never
  from request data; connect and read timeouts and a short retry budget, so an
  unreachable store fails in seconds. Reads are streamed and counted as they arrive.

Every failure comes out as one of four errors naming the URL (never credentials):
``ObjectNotFound``, ``ObjectTooLarge``, ``ObjectAccessDenied``, ``ObjectStoreUnavailable``
(refused, timed out, 5xx), all ``ObjectStoreError``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import obstore
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    NotModifiedError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import AzureStore, GCSStore, S3Store

from shared.errors import OfaEntailError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, ObjectStore, RetryConfig, S3Config

    from shared.settings import Settings

SCHEMES = ("s3", "gs", "az")
# Chunks a stream hands out are at least this big (the last one excepted), so a read
# past its limit stops within one chunk of it; each is a copy into Python bytes.
STREAM_CHUNK_BYTES = 256 * 1024
# Multipart uploads: each part is held in memory until sent, a few in flight at once.
PART_BYTES = 8 * 1024 * 1024
PART_CONCURRENCY = 4
# The longest any one request may take, body included: a manifest streamed while its
# rows are processed can take a while; a stalled one is cut by the read timeout.
REQUEST_LIMIT = timedelta(hours=2)
MAX_KEY_BYTES = 1024

_BUCKET = {
    # S3 (and S3-compatible servers, which follow its rules): 3-63 characters.
    "s3": re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]"),
    # GCS: up to 222 with dots, each dot-separated part at most 63; underscores allowed.
    "gs": re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"),
    # Azure containers: lowercase letters, digits and single hyphens, 3-63.
    "az": re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}"),
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_STATUS = re.compile(r"status code: (\d{3})")


# --- errors --------------------------------------------------------------------------


class ObjectStoreError(OfaEntailError):
    """An object-store operation failed; ``url`` names the object (or prefix)."""

    title = "object store error"

    def __init__(self, url: str, detail: str) -> None:
        self.url = url
        self.detail = detail
        super().__init__(f"{url}: {detail}")


class ObjectNotFound(ObjectStoreError):
    """No object (or no bucket) at the URL."""

    title = "object not found"

    def __init__(self, url: str) -> None:
        super().__init__(url, "no such object")


class ObjectTooLarge(ObjectStoreError):
    """The object is longer than the caller's limit; nothing past it was read."""

    title = "object too large"

    def __init__(self, url: str, limit: int) -> None:
        self.limit = limit
        super().__init__(url, f"object larger than {limit} bytes")


class ObjectAccessDenied(ObjectStoreError):
    """The service's credentials may not do this (403, 401, or no credentials)."""

    title = "object access denied"

    def __init__(self, url: str) -> None:
        super().__init__(url, "access denied to the service's credentials")


class ObjectStoreUnavailable(ObjectStoreError):
    """The store could not be reached or failed: refused, timed out, or a 5xx."""

    title = "object store unavailable"

    def __init__(self, url: str, detail: str = "object store unreachable or failing") -> None:
        super().__init__(url, detail)


# --- URLs and the allow-list ---------------------------------------------------------


def is_object_url(value: str) -> bool:
    """Whether ``value`` names an object store (``s3://``, ``gs://``, ``az://``) rather
    than anything else (an HTTP URL, a path); it may still be malformed."""
    scheme, sep, _ = value.partition("://")
    return bool(sep) and scheme in SCHEMES


@dataclass(frozen=True)
class ObjectUrl:
    """``scheme://bucket/key``: an object, or with ``key`` empty (or a prefix) a place
    to list. Keys are taken literally (no percent-decoding), as the clouds' own tools
    do."""

    scheme: str
    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, url: str, *, key_required: bool = True) -> ObjectUrl:
        """Parse ``url``; ``ValueError`` (text naming the URL) when it is not an object
        URL or is malformed: no bucket, a bucket the cloud would refuse, no key (unless
        ``key_required`` is false: a bucket or a prefix), an empty, ``.`` or ``..`` key
        segment, control characters, a key over 1024 bytes."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in SCHEMES:
            raise ValueError(f"not an object URL (s3://, gs://, az://): {url!r}")
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {url!r}")
        if not _BUCKET[scheme].fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"bad bucket name {bucket!r} in {url!r}")
        if _CONTROL.search(key):
            raise ValueError(f"control characters in the key of {url!r}")
        key = key.removesuffix("/") if not key_required else key
        if not key:
            if key_required:
                raise ValueError(f"no object key in {url!r}")
            return cls(scheme, bucket)
        if any(part in ("", ".", "..") for part in key.split("/")):
            raise ValueError(f"empty, '.' or '..' path segment in the key of {url!r}")
        if len(key.encode()) > MAX_KEY_BYTES:
            raise ValueError(f"key longer than {MAX_KEY_BYTES} bytes in {url[:80]!r}...")
        return cls(scheme, bucket, key)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    def child(self, name: str) -> ObjectUrl:
        """The object ``name`` under this prefix."""
        return ObjectUrl(self.scheme, self.bucket, f"{self.key}/{name}" if self.key else name)

    def within(self, prefix: ObjectUrl) -> bool:
        """Whether this URL lies in ``prefix``'s bucket, under its key on a path-segment
        boundary (``a/b`` holds ``a/b/c``, never ``a/bc``)."""
        if (self.scheme, self.bucket) != (prefix.scheme, prefix.bucket):
            return False
        return not prefix.key or self.key == prefix.key or self.key.startswith(prefix.key + "/")


class BucketPolicy:
    """Which object URLs a request may name: ``allows(url, key_list)``.

    Entries are ``scheme://bucket`` (the whole bucket) or ``scheme://bucket/prefix/``
    (keys under that prefix, matched on path segments). A bucket matches by its whole
    name: ``s3://shop`` never allows ``s3://shop-eu``."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = _entries(entries, "OFA_OBJECT_BUCKETS")

    def allows(self, url: str | ObjectUrl, key_list: Sequence[str] | None = None) -> bool:
        """Whether ``url`` is inside the global list and, when the API key carries a
        list of its own (``key_list``, possibly empty: nothing), inside that too. A
        malformed URL is never allowed."""
        try:
            target = url if isinstance(url, ObjectUrl) else ObjectUrl.parse(url, key_required=False)
        except ValueError:
            return False
        if not any(target.within(e) for e in self.entries):
            return False
        if key_list is None:
            return True
        return any(target.within(e) for e in _entries(key_list, "the key's bucket list"))


def _entries(entries: Iterable[str], where: str) -> tuple[ObjectUrl, ...]:
    out = []
    for entry in entries:
        try:
            out.append(ObjectUrl.parse(entry.strip(), key_required=False))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return tuple(out)


# --- the client ----------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectMeta:
    """What a HEAD (or a listing) says of an object."""

    url: ObjectUrl
    size: int
    etag: str | None
    last_modified: datetime


def _meta(url: ObjectUrl, raw: Any) -> ObjectMeta:
    return ObjectMeta(url, int(raw["size"]), raw.get("e_tag"), raw["last_modified"])


@contextmanager
def _mapped(url: ObjectUrl | str) -> Iterator[None]:
    """obstore's errors as ours. obstore reports refused connections, timeouts and
    5xx (after its retries) as a generic error carrying the status, if any, in text."""
    try:
        yield
    except ObjectStoreError:
        raise
    except (NotFoundError, FileNotFoundError):
        raise ObjectNotFound(str(url)) from None
    except (PermissionDeniedError, UnauthenticatedError) as exc:
        raise ObjectAccessDenied(str(url)) from exc
    except BaseError as exc:
        status = _STATUS.search(str(exc))
        code = int(status[1]) if status else None
        if code in (401, 403):
            raise ObjectAccessDenied(str(url)) from exc
        if code is None or code >= 500 or code in (408, 429):
            raise ObjectStoreUnavailable(str(url)) from exc
        raise ObjectStoreError(str(url), f"the store answered {code}") from exc
    except (TimeoutError, ConnectionError) as exc:
        raise ObjectStoreUnavailable(str(url)) from exc


def _as_url(url: str | ObjectUrl, *, key_required: bool = True) -> ObjectUrl:
    return url if isinstance(url, ObjectUrl) else ObjectUrl.parse(url, key_required=key_required)


def bounded(chunks: Iterable[bytes], url: str | ObjectUrl, max_bytes: int) -> Iterator[bytes]:
    """``chunks`` as they arrive, counted: ``ObjectTooLarge`` as soon as the count passes
    ``max_bytes``, before the chunk that crossed it is handed on (so at most one chunk
    past the limit is ever read)."""
    seen = 0
    for chunk in chunks:
        seen += len(chunk)
        if seen > max_bytes:
            raise ObjectTooLarge(str(url), max_bytes)
        yield chunk


class ObjectStorage:
    """Reads and writes objects by URL; one obstore store per (scheme, bucket), built on
    first use and kept. Blocking methods for the coordinator's and workers' threads,
    ``a``-prefixed ones for the API's event loop. Callers check ``BucketPolicy`` before
    touching a URL a request named."""

    def __init__(
        self,
        *,
        s3_endpoint_url: str = "",
        s3_region: str = "",
        s3_allow_http: bool = False,
        timeout_s: float = 10.0,
    ) -> None:
        self.s3_endpoint_url = s3_endpoint_url
        self.s3_region = s3_region
        self.s3_allow_http = s3_allow_http
        self.timeout_s = timeout_s
        self._stores: dict[tuple[str, str], ObjectStore] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStorage:
        """The client the settings describe (``OFA_S3_*``, ``OFA_OBJECT_TIMEOUT_S``)."""
        return cls(
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
            s3_allow_http=settings.s3_allow_http,
            timeout_s=settings.object_timeout_s,
        )

    # -- stores

    def store(self, url: ObjectUrl) -> ObjectStore:
        """The store for ``url``'s bucket (built once)."""
        key = (url.scheme, url.bucket)
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                store = self._stores[key] = self._build(url)
            return store

    def _build(self, url: ObjectUrl) -> ObjectStore:
        # Connects, and each read of an answer, wait at most the timeout (a stalled
        # stream included); a failed request is retried briefly, and no retry starts
        # once the timeout has passed since the first try.
        client: ClientConfig = {
            "connect_timeout": timedelta(seconds=min(3.0, self.timeout_s)),
            "read_timeout": timedelta(seconds=self.timeout_s),
            "timeout": REQUEST_LIMIT,
        }
        retry: RetryConfig = {
            "max_retries": 2,
            "retry_timeout": timedelta(seconds=self.timeout_s),
            "backoff": {
                "init_backoff": timedelta(milliseconds=100),
                "max_backoff": timedelta(seconds=1),
                "base": 2,
            },
        }
        if url.scheme == "s3":
            config: S3Config = {}
            if self.s3_endpoint_url:
                config["endpoint"] = self.s3_endpoint_url
            if self.s3_region:
                config["region"] = self.s3_region
            if self.s3_allow_http:
                client["allow_http"] = True
            return S3Store(url.bucket, config=config, client_options=client, retry_config=retry)
        if url.scheme == "gs":
            return GCSStore(url.bucket, client_options=client, retry_config=retry)
        return AzureStore(url.bucket, client_options=client, retry_config=retry)

    # -- blocking

    def head(self, url: str | ObjectUrl) -> ObjectMeta:
        """The object's size, ETag and last-modified time."""
        target = _as_url(url)
        with _mapped(target):
            return _meta(target, obstore.head(self.store(target), target.key))

    def read_stream(
        self,
        url: str | ObjectUrl,
        max_bytes: int,
        *,
        start: int = 0,
        chunk_bytes: int = STREAM_CHUNK_BYTES,
    ) -> Iterator[bytes]:
        """The object's bytes from ``start``, in chunks as they arrive, never held
        whole. The request is made here (a missing object raises now); an object whose
        size is over ``max_bytes`` raises ``ObjectTooLarge`` before any byte is read,
        and the stream is counted too, raising within one chunk past the limit."""
        target = _as_url(url)
        with _mapped(target):
            options: Any = {"range": {"offset": start}} if start else None
            result = obstore.get(self.store(target), target.key, options=options)
            if int(result.meta["size"]) > max_bytes:
                raise ObjectTooLarge(str(target), max_bytes)
            stream = result.stream(min_chunk_size=chunk_bytes)
        return self._relay(target, bounded(stream, target, max_bytes - start))

    @staticmethod
    def _relay(url: ObjectUrl, chunks: Iterator[bytes]) -> Iterator[bytes]:
        with _mapped(url):
            yield from chunks

    def read_bytes(
        self, url: str | ObjectUrl, max_bytes: int, if_none_match: str | None = None
    ) -> tuple[bytes | None, str | None]:
        """(the object's bytes, its ETag), or (None, the ETag given) when the object
        still has the ETag ``if_none_match`` (the caller's copy is current). At most
        ``max_bytes`` (``ObjectTooLarge`` past it, within one chunk)."""
        target = _as_url(url)
        with _mapped(target):
            try:
                options: Any = {"if_none_match": if_none_match} if if_none_match else None
                result = obstore.get(self.store(target), target.key, options=options)
            except NotModifiedError:
                return None, if_none_match
            if int(result.meta["size"]) > max_bytes:
                raise ObjectTooLarge(str(target), max_bytes)
            stream = result.stream(min_chunk_size=STREAM_CHUNK_BYTES)
            data = b"".join(bounded(stream, target, max_bytes))
            return data, result.meta.get("e_tag")

    def write_stream(self, url: str | ObjectUrl, chunks: Iterable[bytes]) -> str | None:
        """Write ``chunks`` as the object, by a multipart upload (parts of 8 MiB, a few
        in flight): the object appears whole once every chunk is sent, or not at all
        (an error from ``chunks`` itself propagates as it is). Returns the ETag."""
        target = _as_url(url)
        with _mapped(target):
            result = obstore.put(
                self.store(target),
                target.key,
                iter(chunks),
                use_multipart=True,
                chunk_size=PART_BYTES,
                max_concurrency=PART_CONCURRENCY,
            )
            return result.get("e_tag")

    def put(self, url: str | ObjectUrl, data: bytes) -> str | None:
        """Write a small object in one request; returns its ETag."""
        target = _as_url(url)
        with _mapped(target):
            result = obstore.put(self.store(target), target.key, data, use_multipart=False)
            return result.get("e_tag")

    def get(self, url: str | ObjectUrl) -> bytes:
        """A small object whole (a payload of known bound); ``ObjectNotFound`` if none."""
        target = _as_url(url)
        with _mapped(target):
            return bytes(obstore.get(self.store(target), target.key).bytes())

    def delete(self, url: str | ObjectUrl) -> None:
        """Remove the object (no error if it is already gone)."""
        target = _as_url(url)
        with _mapped(target):
            obstore.delete(self.store(target), target.key)

    def list(self, prefix: str | ObjectUrl) -> Iterator[ObjectMeta]:
        """Every object under ``prefix`` (a bucket, or a key prefix matched on path
        segments), with size and last-modified time, fetched page by page."""
        target = _as_url(prefix, key_required=False)
        with _mapped(target):
            pages = obstore.list(self.store(target), target.key or None, chunk_size=1000)
            for page in pages:
                for raw in page:
                    yield _meta(ObjectUrl(target.scheme, target.bucket, raw["path"]), raw)

    # -- asyncio

    async def ahead(self, url: str | ObjectUrl) -> ObjectMeta:
        """``head`` for the event loop."""
        target = _as_url(url)
        with _mapped(target):
            return _meta(target, await obstore.head_async(self.store(target), target.key))

    async def aread_bytes(
        self, url: str | ObjectUrl, max_bytes: int, if_none_match: str | None = None
    ) -> tuple[bytes | None, str | None]:
        """``read_bytes`` for the event loop."""
        target = _as_url(url)
        with _mapped(target):
            try:
                options: Any = {"if_none_match": if_none_match} if if_none_match else None
                result = await obstore.get_async(self.store(target), target.key, options=options)
            except NotModifiedError:
                return None, if_none_match
            if int(result.meta["size"]) > max_bytes:
                raise ObjectTooLarge(str(target), max_bytes)
            parts: list[bytes] = []
            seen = 0
            async for chunk in result.stream(min_chunk_size=STREAM_CHUNK_BYTES):
                seen += len(chunk)
                if seen > max_bytes:
                    raise ObjectTooLarge(str(target), max_bytes)
                parts.append(chunk)
            return b"".join(parts), result.meta.get("e_tag")

    async def aread_stream(
        self, url: str | ObjectUrl, max_bytes: int, *, start: int = 0
    ) -> AsyncIterator[bytes]:
        """``read_stream`` for the event loop (an async generator: the request is made
        on the first iteration)."""
        target = _as_url(url)
        with _mapped(target):
            options: Any = {"range": {"offset": start}} if start else None
            result = await obstore.get_async(self.store(target), target.key, options=options)
            if int(result.meta["size"]) > max_bytes:
                raise ObjectTooLarge(str(target), max_bytes)
            seen = start
            async for chunk in result.stream(min_chunk_size=STREAM_CHUNK_BYTES):
                seen += len(chunk)
                if seen > max_bytes:
                    raise ObjectTooLarge(str(target), max_bytes)
                yield chunk

    async def adelete(self, url: str | ObjectUrl) -> None:
        """``delete`` for the event loop."""
        target = _as_url(url)
        with _mapped(target):
            await obstore.delete_async(self.store(target), target.key)
