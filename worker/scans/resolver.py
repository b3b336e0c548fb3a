"""How a manifest row becomes texts, an image digest (and maybe bytes) and a key.

Images come from a URL, a path under ``OFA_IMAGE_ROOT`` or base64, with bounded
concurrency (the caller's semaphore). An unchanged remote image is not downloaded
again: its ETag / Last-Modified and SHA-256 are remembered in the cache store, and
asked about with If-None-Match / If-Modified-Since. A row's own ``sha256`` is trusted
for the cache lookup (its URL or file is not touched when the verdict is cached) and
checked whenever the image has to be fetched or read.

A row's key always names the bytes a job is given: a URL remembered as unchanged (a
304) whose verdict is not cached is fetched again, and if the bytes that come back are
not the remembered ones, the row is keyed by the new bytes (``image_for_job``) and
the remembered digest replaced, so a URL that changes (or a server that lies with
304) can never put one image's verdict under another's digest.

An image may also be an object URL (``s3://``, ``gs://``, ``az://``): read through
``shared/objects.py`` with the service's own credentials, only when it lies in
``OFA_OBJECT_BUCKETS`` and in the scan owner's bucket list (if the key has one;
otherwise that row's error), at most ``OFA_MAX_UPLOAD_BYTES``, and revalidated by its
ETag (``If-None-Match``) exactly as an HTTP URL is. The worker checks the
same thing again before scoring (``worker/jobs.py:image_matches_key``).

A miss's job names its image instead of carrying it when the workers can read it
where it is (``reference_for_job``): an object URL, or a file under
``OFA_IMAGE_ROOT`` when ``OFA_IMAGE_ROOT_SHARED`` says the workers see the same path.
Nothing is copied into the payload store for it; the worker reads it and checks it
hashes to the job's key (a changed image fails that job).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from shared.errors import BadInputError, OfaEntailError, RowError
from shared.fetch import Fetched, UrlPolicy, fetch
from shared.images import check_image, decode_base64
from shared.keys import Keys, image_digest, verdict_key_for_digest
from shared.objects import BucketPolicy, ObjectStorage, is_object_url
from shared.scans.manifest import Row, file_under
from shared.settings import Settings
from shared.store import decode_hash
from shared.text import check_text

logger = logging.getLogger(__name__)


@dataclass
class Resolved:
    """A row with its image identified (bytes may still be unfetched)."""

    row: Row
    text: str
    premise: str | None
    digest: bytes | None = None
    image: bytes | None = None
    url: str | None = None
    path: str | None = None  # a file under the image root, read only if a job needs it
    file: str | None = None  # the row's image file name (under the image root), if any
    expected: bytes | None = None  # the row's own sha256, to verify on fetch
    error: str | None = None
    key: str | None = None
    # The API key whose private cache the scan's verdicts go to (OFA_CACHE_SCOPE=key).
    tenant: str | None = None

    @property
    def to_fetch(self) -> bool:
        """A URL row with no digest yet (no sha256 of its own): ``RowResolver.fetch``
        next."""
        return self.url is not None and self.digest is None

    @property
    def remote(self) -> bool:
        """Its image is still only a URL's: a job's bytes need ``image_for_job``'s
        fetch (otherwise ``local_image_for_job`` reads or checks them)."""
        return self.image is None and self.path is None


class RowResolver:
    """Resolves rows for one coordinator process (owns the remembered URL metadata)."""

    def __init__(
        self,
        settings: Settings,
        keys: Keys,
        cache: redis.Redis,
        policy: UrlPolicy,
        objects: ObjectStorage | None = None,
    ) -> None:
        self.settings = settings
        self.keys = keys
        self.cache = cache
        self.policy = policy
        self.objects = objects or ObjectStorage.from_settings(settings)
        self.buckets = BucketPolicy(settings.object_buckets)

    def read(
        self, row: Row, tenant: str | None = None, buckets: list[str] | None = None
    ) -> Resolved:
        """Everything about the row that needs no network: its texts, and its digest
        and key (in ``tenant``'s private cache, if any) unless its image is a URL to
        fetch (then ``to_fetch``); an object URL outside ``buckets`` (the scan owner's
        list) or ``OFA_OBJECT_BUCKETS`` is the row's error. Never raises: a row's
        problem is its ``error``."""
        try:
            r = self._read(row, buckets)
            r.tenant = tenant
            return self._keyed(r)
        except ROW_FAULTS as exc:
            return _failed(row, exc)

    async def fetch(self, r: Resolved, client: httpx.AsyncClient) -> Resolved:
        """A row ``read`` left ``to_fetch``, with its digest (and bytes on a 200) and
        key, or its error. Never raises."""
        try:
            await self._fetch_url(r, client)
            return self._keyed(r)
        except ROW_FAULTS as exc:
            return _failed(r.row, exc)

    def _keyed(self, r: Resolved) -> Resolved:
        if r.digest is not None:
            model_id, revision = self.settings.model_tag
            r.key = verdict_key_for_digest(
                model_id, revision, r.digest, r.text, r.premise, r.tenant
            )
        return r

    def _read(self, row: Row, buckets: list[str] | None = None) -> Resolved:
        fields = row.fields
        s = self.settings
        if "__error__" in fields:
            raise RowError(fields["__error__"])
        if not row.item_id:
            raise RowError("missing id")
        text = check_text(fields.get("text"), "text", s.max_text_chars, required=True)
        premise = check_text(fields.get("premise"), "premise", s.max_text_chars, False)
        assert text is not None
        r = Resolved(row, text, premise)
        expected = fields.get("sha256")
        if expected is not None:
            try:
                r.expected = bytes.fromhex(str(expected))
            except ValueError:
                r.expected = b""
            if len(r.expected) != 32:
                raise RowError("sha256 must be 64 hexadecimal characters")
        source, kind = self._image_source(fields)
        object_url = kind == "url" and is_object_url(source)
        if object_url and not self.buckets.allows(source, buckets):
            raise RowError(
                "the image's bucket is not allowed for this scan's API key "
                "(OFA_OBJECT_BUCKETS, the key's own list)"
            )
        if kind == "url":
            r.url = source
            # A row's own sha256 is trusted for the lookup; the image is verified if
            # it is ever fetched. Without one, the row is to be fetched.
            r.digest = r.expected
            return r
        if kind == "path":
            r.file = source
        if kind == "path" and r.expected is not None:
            # Trusted for the lookup, like a URL's: the file is found, read and checked
            # only if the row needs a job (a cached rescan touches no file).
            r.path, r.digest = source, r.expected
            return r
        if kind == "base64":
            r.image = decode_base64(source, s.max_upload_bytes)
        else:
            r.image = self._read_path(source)
        r.digest = image_digest(r.image)
        if r.expected is not None and r.digest != r.expected:
            raise RowError("the image does not match the row's sha256")
        return r

    def _image_source(self, fields: dict[str, Any]) -> tuple[str, str]:
        for name, kind in (
            ("image_url", "url"),
            ("image_path", "path"),
            ("image_base64", "base64"),
        ):
            if fields.get(name):
                return str(fields[name]), kind
        image = fields.get("image")
        if not image or not isinstance(image, str):
            raise RowError("missing image")
        if image.startswith(("http://", "https://")) or is_object_url(image):
            return image, "url"
        if image.startswith("data:"):
            return image, "base64"
        if "://" in image:
            raise RowError("image URLs must be http(s), s3, gs or az")
        return image, "path"

    def _read_path(self, name: str) -> bytes:
        try:
            path = file_under(self.settings.image_root, name, "image", "OFA_IMAGE_ROOT")
        except ValueError as exc:
            raise RowError(str(exc)) from exc
        limit = self.settings.max_upload_bytes
        with open(path, "rb", buffering=0) as f:
            # Read the file's size plus one byte, never more than one byte past the
            # limit: a read of the limit itself would allocate (and map) that much
            # for every row, ~40% of reading a thumbnail.
            size = os.fstat(f.fileno()).st_size
            data = f.read(min(size, limit) + 1)
        if len(data) > limit:
            raise RowError(f"image is larger than {limit} bytes")
        return data

    async def _fetch_url(self, r: Resolved, client: httpx.AsyncClient) -> None:
        """Conditional GET when the URL was seen before; fills digest (and image on 200)."""
        assert r.url is not None
        meta_key = self._meta_key(r.url)
        meta = decode_hash(self.cache.hgetall(meta_key))
        known = meta.get("sha256")
        etag = meta.get("etag") if known else None
        if is_object_url(r.url):
            found = await self._read_object(r.url, etag)
        else:
            found = await fetch(
                r.url,
                self.policy,
                client,
                etag=etag,
                last_modified=meta.get("last_modified") if known else None,
            )
        if found.not_modified and known:
            r.digest = bytes.fromhex(known)
            return
        assert found.body is not None
        r.image = found.body
        r.digest = image_digest(found.body)
        self._remember(meta_key, found, r.digest, had=bool(meta))

    async def _read_object(self, url: str, etag: str | None = None) -> Fetched:
        """An object image as an HTTP fetch would have found it: its bytes and ETag, or
        ``not_modified`` when it still has ``etag``. At most the upload limit."""
        body, new_etag = await self.objects.aread_bytes(
            url, self.settings.max_upload_bytes, if_none_match=etag
        )
        return Fetched(body, new_etag, None, not_modified=body is None)

    def _meta_key(self, url: str) -> str:
        return self.keys.url_meta(hashlib.sha256(url.encode()).hexdigest())

    def _remember(self, meta_key: str, found: Fetched, digest: bytes, had: bool = True) -> None:
        """The URL's validators and the digest of the body it just served, in place of
        what was remembered (forgotten when the answer carried no validators: the next
        scan must not revalidate the old body's ETag and be told it is unchanged)."""
        fields: dict[Any, Any] = {"sha256": digest.hex()}
        if found.etag:
            fields["etag"] = found.etag
        if found.last_modified:
            fields["last_modified"] = found.last_modified
        if not (found.etag or found.last_modified or had):
            return
        pipe = self.cache.pipeline(transaction=False)
        pipe.delete(meta_key)
        if found.etag or found.last_modified:
            pipe.hset(meta_key, mapping=fields)
            pipe.expire(meta_key, self.settings.url_meta_ttl_s)
        pipe.execute()

    async def image_for_job(self, r: Resolved, client: httpx.AsyncClient) -> bytes:
        """The image bytes a miss's job needs, fetched if only the digest is known,
        and checked to decode (a row the model could never take fails here).

        A row whose digest was the one remembered for its URL (a 304) and that gets
        other bytes now (the image changed between the two requests, or the server
        answered 304 for a changed body) is keyed by the bytes it got: its ``digest``
        and ``key`` change (the caller looks the new key up) and the URL's remembered
        digest becomes theirs. Re-keying rather than refusing: the scan asks what the
        URL serves, and a changed image is not the row's fault; the verdict is stored
        only under the bytes scored either way. A row's own ``sha256`` is a promise
        instead: other bytes fail the row."""
        if r.remote:
            assert r.url is not None
            try:
                if is_object_url(r.url):
                    found = await self._read_object(r.url)
                else:
                    found = await fetch(r.url, self.policy, client)
            except OfaEntailError as exc:
                raise RowError(str(exc)) from exc
            assert found.body is not None
            digest = image_digest(found.body)
            if r.expected is not None and digest != r.expected:
                raise RowError("the image does not match the row's sha256")
            if digest != r.digest:
                logger.info("row %d: %s changed since it was remembered", r.row.idx, r.url)
                r.digest = digest
                self._keyed(r)
                self._remember(self._meta_key(r.url), found, digest)
            r.image = found.body
        return self.local_image_for_job(r)

    def reference_for_job(self, r: Resolved) -> str | None:
        """What a miss's job names its image by when the workers read it in place (no
        copy into the payload store): its object URL, or ``file:`` and the file's real
        path under a shared ``OFA_IMAGE_ROOT``; None when the job must carry the bytes.
        ``RowError`` for a file that is not there."""
        if r.url is not None and is_object_url(r.url):
            return r.url
        if r.file is not None and self.settings.image_root_shared:
            try:
                path = file_under(self.settings.image_root, r.file, "image", "OFA_IMAGE_ROOT")
            except ValueError as exc:
                raise RowError(str(exc)) from exc
            return f"file:{path}"
        return None

    def local_image_for_job(self, r: Resolved) -> bytes:
        """``image_for_job`` for a row whose image needs no network: its bytes, or its
        file (named with its sha256) read now."""
        if r.image is None and r.path is not None:
            image = self._read_path(r.path)
            if image_digest(image) != r.expected:
                raise RowError("the image does not match the row's sha256")
            r.image = image
        assert r.image is not None, "a remote row's image: image_for_job fetches it"
        try:
            check_image(r.image, self.settings.max_pixels)
        except BadInputError as exc:
            raise RowError(f"{exc.title}: {exc.detail}") from exc
        return r.image


# What a row may provoke: its own error, or anything else it makes a parser, the file
# system or the network raise, which is that row's error too, never the slice's.
ROW_ERRORS = (RowError, BadInputError, OfaEntailError)
ROW_FAULTS = (
    *ROW_ERRORS,
    OSError,
    ValueError,
    TypeError,
    RecursionError,
    httpx.HTTPError,
)


def _failed(row: Row, exc: BaseException) -> Resolved:
    if isinstance(exc, ROW_ERRORS):
        return Resolved(row, "", None, error=str(exc))
    logger.warning("row %d: %s: %s", row.idx, type(exc).__name__, exc)
    return Resolved(row, "", None, error=f"{type(exc).__name__}: {exc}"[:500])
