"""The payload store: images of unfinished jobs, held from submission until a worker is
done with them. A payload is named by the SHA-256 of its bytes, or (the service's jobs)
by ``{verdict key}.{job id}`` (``shared/keys.py:payload_name``): one payload per job, so
ending a job never removes another job's image. A name that is a bare digest is checked
against the bytes read; a job's name is checked by the worker against the job's key.

One interface (``PayloadStore``), four backends, chosen by ``OFA_PAYLOAD_STORE``
(``shared/wiring.py:payload_store``):

- ``local``: a folder (``OFA_PAYLOAD_DIR``, default ``OFA_DATA_DIR/payloads``), a shared
  volume when pointed at one. Written to a temporary name, flushed to disk, then renamed,
  so a reader sees a whole payload or none.
- ``s3://bucket/prefix`` (or ``gs://``, ``az://``): an object-store prefix, through
  ``shared/objects.py``.
- Redis nodes (``redis``: ``OFA_PAYLOAD_REDIS_URLS``; or the URLs themselves): each
  digest lives on one node, chosen by rendezvous hashing, so adding a node moves only
  the payloads it now wins (about 1/n).
- ``durable``: the durable Redis itself (``DurablePayloads``), each payload expiring
  after the blob lifetime; the simplest deployment, and the baseline to compare with.

The caller writes a payload before the job record that names it, reads it in the
worker, deletes it when the job ends, and calls ``sweep`` periodically for payloads
older than the blob lifetime (``OFA_BLOB_TTL_S``) that no record names: what a crash
between the write and the record leaves behind. Redis payloads also expire by
themselves after that lifetime. Any backend failure (unreachable, refused, full) comes
out as ``PayloadStoreUnavailable``: the API answers 503, the worker retries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

import redis

from shared.errors import PayloadStoreUnavailable
from shared.objects import (
    ObjectNotFound,
    ObjectStorage,
    ObjectStoreError,
    ObjectUrl,
    is_object_url,
)
from shared.settings import split_urls

if TYPE_CHECKING:
    from shared.settings import Settings

__all__ = [
    "DurablePayloads",
    "LocalPayloads",
    "ObjectPayloads",
    "PayloadStore",
    "PayloadStoreUnavailable",
    "RedisPayloads",
    "payload_store",
]

logger = logging.getLogger(__name__)

DIGEST = re.compile(r"[0-9a-f]{64}")
# What may name a payload: a bare digest, or a job's ``{verdict key}.{job id}`` (a
# verdict key is a digest too; any lowercase word is let through for it, never a path
# separator or a second dot, so a name is always a plain file name and a plain key).
NAME = re.compile(r"[0-9a-f]{64}|[0-9a-z_-]{1,64}\.[0-9a-f]{32}")
# Digests asked about at once when sweeping (``referenced``), and deleted at once.
SWEEP_BATCH = 500
TMP_SUFFIX = ".tmp"

Referenced = Callable[[Sequence[str]], Collection[str]]
"""Given candidate names, those some job record still names (kept by ``sweep``)."""


def check_digest(digest: str) -> str:
    """``digest`` if it is a payload name (``NAME``: a lowercase SHA-256 hex digest, or
    one with a job id after a dot), else ``ValueError``: it becomes a file name or a
    key, so nothing else may pass."""
    if not NAME.fullmatch(digest):
        raise ValueError(f"not a payload name (a SHA-256 hex digest[.job id]): {digest[:80]!r}")
    return digest


def digest_of(data: bytes) -> str:
    """The name a payload is stored under."""
    return hashlib.sha256(data).hexdigest()


def _intact(digest: str, data: bytes) -> bytes | None:
    """``data`` if it still hashes to ``digest``; a torn or altered copy reads as gone.
    A job's payload (a name with a job id) is checked by the worker against the job's
    key instead, which names the image's digest."""
    if not DIGEST.fullmatch(digest) or digest_of(data) == digest:
        return data
    logger.warning("payload %s does not match its digest: treated as missing", digest)
    return None


def _batches(items: Iterable[str], size: int = SWEEP_BATCH) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _unreferenced(batch: list[str], referenced: Referenced | None) -> list[str]:
    if referenced is None:
        return batch
    keep = set(referenced(batch))
    return [d for d in batch if d not in keep]


class PayloadStore(Protocol):
    """Images of unfinished jobs by SHA-256 hex digest."""

    def put(self, digest: str, data: bytes) -> None:
        """Store ``data`` under ``digest`` (idempotent; refreshes its age). Returns once
        it is stored."""

    def get(self, digest: str) -> bytes | None:
        """The payload, or None if there is none (ended, swept, never written)."""

    def delete(self, digest: str) -> None:
        """Remove the payload (no error if it is gone)."""

    def delete_many(self, digests: Sequence[str]) -> None:
        """Remove several payloads (a batch of jobs that ended), in as few calls as the
        backend allows."""

    def sweep(self, older_than_s: float, referenced: Referenced | None = None) -> int:
        """Remove payloads written more than ``older_than_s`` ago, except those
        ``referenced`` says a record still names; returns how many went."""

    def ping(self) -> None:
        """Raise ``PayloadStoreUnavailable`` unless the store can be written now."""

    def close(self) -> None:
        """Release connections."""


# --- a folder ------------------------------------------------------------------------


class LocalPayloads:
    """Payloads as files ``root/ab/abcdef...`` (two hex characters fan the folder out)."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.fsync = fsync

    def path(self, digest: str) -> Path:
        """The file a payload lives in."""
        check_digest(digest)
        return self.root / digest[:2] / digest

    @contextmanager
    def _mapped(self, what: str) -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise PayloadStoreUnavailable(str(self.root), f"{what}: {exc.strerror or exc}") from exc

    def put(self, digest: str, data: bytes) -> None:
        """Write to a temporary name in the same folder, flush, rename over: readers see
        the whole payload or none. One already there is only touched (its age reset)."""
        path = self.path(digest)
        with self._mapped("write"):
            try:
                if path.stat().st_size == len(data):
                    os.utime(path)
                    return
            except FileNotFoundError:
                pass
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{digest}.{uuid.uuid4().hex}{TMP_SUFFIX}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise

    def get(self, digest: str) -> bytes | None:
        """The payload's bytes, or None."""
        path = self.path(digest)
        with self._mapped("read"):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                return None
        return _intact(digest, data)

    def delete(self, digest: str) -> None:
        """Remove the file."""
        path = self.path(digest)
        with self._mapped("delete"):
            path.unlink(missing_ok=True)

    def delete_many(self, digests: Sequence[str]) -> None:
        """Remove each file."""
        for digest in digests:
            self.delete(digest)

    def sweep(self, older_than_s: float, referenced: Referenced | None = None) -> int:
        """Remove old unreferenced payloads and old temporary files (a writer that died
        mid-write). A file is looked at again just before it goes: one a ``put`` touched
        meanwhile stays."""
        cutoff = time.time() - older_than_s
        removed = 0
        for batch in _batches(self._old(cutoff)):
            for digest in _unreferenced(batch, referenced):
                path = self.root / digest[:2] / digest
                with self._mapped("sweep"):
                    try:
                        if path.stat().st_mtime < cutoff:
                            path.unlink()
                            removed += 1
                    except FileNotFoundError:
                        continue
        return removed

    def _old(self, cutoff: float) -> Iterator[str]:
        """Digests of payloads last written before ``cutoff``; stale temporary files are
        removed on the way."""
        with self._mapped("sweep"):
            if not self.root.is_dir():
                return
            for folder in self.root.iterdir():
                if not folder.is_dir() or len(folder.name) != 2:
                    continue
                for entry in os.scandir(folder):
                    try:
                        old = entry.stat().st_mtime < cutoff
                    except FileNotFoundError:
                        continue
                    if not old:
                        continue
                    if entry.name.endswith(TMP_SUFFIX):
                        Path(entry.path).unlink(missing_ok=True)
                    elif NAME.fullmatch(entry.name):
                        yield entry.name

    def ping(self) -> None:
        """Write and remove a probe file (an unmounted or read-only volume fails)."""
        with self._mapped("probe"):
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".ping.{uuid.uuid4().hex}{TMP_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()

    def close(self) -> None:
        """Nothing to release."""


# --- an object-store prefix ----------------------------------------------------------


class ObjectPayloads:
    """Payloads as objects ``prefix/abcdef...`` in S3, GCS or Azure."""

    def __init__(self, storage: ObjectStorage, prefix: ObjectUrl) -> None:
        self.storage = storage
        self.prefix = prefix

    def url(self, digest: str) -> ObjectUrl:
        """The object a payload lives in."""
        return self.prefix.child(check_digest(digest))

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except ObjectStoreError as exc:
            raise PayloadStoreUnavailable(str(self.prefix), str(exc)) from exc

    def put(self, digest: str, data: bytes) -> None:
        """One PUT (atomic in every object store); writing it again refreshes its age."""
        with self._mapped():
            self.storage.put(self.url(digest), data)

    def get(self, digest: str) -> bytes | None:
        """The payload's bytes, or None."""
        with self._mapped():
            try:
                data = self.storage.get(self.url(digest))
            except ObjectNotFound:
                return None
        return _intact(digest, data)

    def delete(self, digest: str) -> None:
        """Remove the object."""
        with self._mapped(), suppress(ObjectNotFound):
            self.storage.delete(self.url(digest))

    def delete_many(self, digests: Sequence[str]) -> None:
        """Remove each object."""
        for digest in digests:
            self.delete(digest)

    def sweep(self, older_than_s: float, referenced: Referenced | None = None) -> int:
        """List the prefix, keep what is young or referenced, HEAD each candidate again
        (a ``put`` since the listing keeps it), delete the rest."""
        cutoff = time.time() - older_than_s
        removed = 0
        for batch in _batches(self._old(cutoff)):
            for digest in _unreferenced(batch, referenced):
                with self._mapped():
                    try:
                        if self.storage.head(self.url(digest)).last_modified.timestamp() < cutoff:
                            self.storage.delete(self.url(digest))
                            removed += 1
                    except ObjectNotFound:
                        continue
        return removed

    def _old(self, cutoff: float) -> Iterator[str]:
        """Digests of payloads last written before ``cutoff``, as the listing pages in."""
        with self._mapped():
            for meta in self.storage.list(self.prefix):
                digest = meta.url.key.rpartition("/")[2]
                if meta.last_modified.timestamp() < cutoff and NAME.fullmatch(digest):
                    yield digest

    def ping(self) -> None:
        """A HEAD under the prefix: an answer (a missing object included) means reachable
        with working credentials."""
        with self._mapped(), suppress(ObjectNotFound):
            self.storage.head(self.prefix.child(".ping"))

    def close(self) -> None:
        """Stores are shared with the rest of the process; nothing to release."""


# --- Redis nodes ---------------------------------------------------------------------


def node_id(url: str) -> str:
    """What names a node for hashing: its URL without credentials or options, so a new
    password moves nothing."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{hosts}{parts.path}"


def rendezvous(digest: str, nodes: Sequence[str]) -> int:
    """The index of the node that holds ``digest``: highest random weight (each node's
    score is a hash of node and digest), so removing a node moves only its own payloads
    and adding one moves only those it now wins."""

    def score(node: str) -> bytes:
        return hashlib.blake2b(f"{node}\0{digest}".encode(), digest_size=8).digest()

    return max(range(len(nodes)), key=lambda i: score(nodes[i]))


# Delete a payload judged old, unless a put renewed its lifetime since.
# KEYS[1]: the payload's key. ARGV[1]: its PTTL (ms) when it was judged old.
# Returns 1 if deleted, else 0.
DELETE_IF_NOT_RENEWED = """
local key = KEYS[1]
local judged_pttl = tonumber(ARGV[1])
local pttl = redis.call('PTTL', key)
if pttl == -2 or pttl > judged_pttl then
    return 0
end
return redis.call('DEL', key)
"""


class RedisPayloads:
    """Payloads as Redis strings ``{key_prefix}{digest}``, spread over nodes by
    ``rendezvous``; each expires after ``ttl_s`` (the blob lifetime), so a node needs no
    sweep to stay bounded, though ``sweep`` works there too (age from the TTL left)."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        key_prefix: str,
        ttl_s: int,
        client: Callable[[str], redis.Redis],
    ) -> None:
        if not urls:
            raise ValueError("a Redis payload store needs at least one node URL")
        self.urls = list(urls)
        self.ids = [node_id(u) for u in self.urls]
        if len(set(self.ids)) != len(self.ids):
            raise ValueError("the same Redis node is named twice in the payload store")
        self.clients = [client(u) for u in self.urls]
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s

    def key(self, digest: str) -> str:
        """The Redis key a payload lives under."""
        return f"{self.key_prefix}{check_digest(digest)}"

    def node(self, digest: str) -> int:
        """The index of the node that holds ``digest``."""
        return rendezvous(check_digest(digest), self.ids)

    @contextmanager
    def _mapped(self, i: int) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise PayloadStoreUnavailable(self.ids[i], f"{type(exc).__name__}: {exc}") from exc

    def put(self, digest: str, data: bytes) -> None:
        """SET with the blob lifetime (again: the lifetime starts over)."""
        i = self.node(digest)
        with self._mapped(i):
            self.clients[i].set(self.key(digest), data, ex=self.ttl_s)

    def get(self, digest: str) -> bytes | None:
        """The payload's bytes, or None."""
        i = self.node(digest)
        with self._mapped(i):
            data = self.clients[i].get(self.key(digest))
        return None if data is None else _intact(digest, bytes(data))  # type: ignore[arg-type]

    def delete(self, digest: str) -> None:
        """Remove the key."""
        i = self.node(digest)
        with self._mapped(i):
            self.clients[i].delete(self.key(digest))

    def delete_many(self, digests: Sequence[str]) -> None:
        """One DEL per node for the payloads it holds."""
        by_node: dict[int, list[str]] = {}
        for digest in digests:
            by_node.setdefault(self.node(digest), []).append(self.key(digest))
        for i, keys in by_node.items():
            with self._mapped(i):
                self.clients[i].delete(*keys)

    def sweep(self, older_than_s: float, referenced: Referenced | None = None) -> int:
        """On each node, payloads whose age (lifetime less the TTL left) is past
        ``older_than_s``, unless referenced; deleted only if the TTL is still what it
        was (a ``put`` meanwhile renewed it)."""
        removed = 0
        for i, client in enumerate(self.clients):
            for judged in self._old(i, older_than_s):
                for digest in _unreferenced(list(judged), referenced):
                    # Deleted only while its TTL is no longer than when it was judged.
                    with self._mapped(i):
                        key = self.key(digest)
                        gone = client.eval(DELETE_IF_NOT_RENEWED, 1, key, judged[digest])
                        removed += int(gone)
        return removed

    def _old(self, i: int, older_than_s: float) -> Iterator[dict[str, int]]:
        """Node ``i``'s payloads older than ``older_than_s`` (their digests and the PTTL
        each had when judged), a batch of scanned keys at a time."""
        client = self.clients[i]
        with self._mapped(i):
            keys = client.scan_iter(match=f"{self.key_prefix}*", count=SWEEP_BATCH)
            for batch in _batches(k.decode() if isinstance(k, bytes) else k for k in keys):
                pipe = client.pipeline(transaction=False)
                for key in batch:
                    pipe.pttl(key)
                judged: dict[str, int] = {}
                for key, pttl in zip(batch, pipe.execute(), strict=True):
                    digest = key[len(self.key_prefix) :]
                    # -1: no expiry (written by hand): as old as can be; -2: already gone.
                    age_s = float("inf") if pttl == -1 else self.ttl_s - pttl / 1000
                    if pttl != -2 and NAME.fullmatch(digest) and age_s > older_than_s:
                        judged[digest] = pttl
                if judged:
                    yield judged

    def ping(self) -> None:
        """PING every node (a payload may live on any of them)."""
        for i, client in enumerate(self.clients):
            with self._mapped(i):
                client.ping()

    def close(self) -> None:
        """Close every node's connections."""
        for client in self.clients:
            client.close()


# --- the durable Redis ---------------------------------------------------------------


class DurablePayloads:
    """Payloads as strings ``{key_prefix}{name}`` in the durable Redis itself, each
    expiring after ``ttl_s`` (the blob lifetime): no store besides Redis, at the cost of
    every image passing through its append-only file. Plain SET, GET and DEL, never
    inside the job scripts; nothing to sweep (the lifetime bounds them)."""

    def __init__(self, client: redis.Redis, *, key_prefix: str, ttl_s: int) -> None:
        self.client = client
        self.key_prefix = key_prefix
        self.ttl_s = ttl_s

    def key(self, digest: str) -> str:
        """The Redis key a payload lives under."""
        return f"{self.key_prefix}{check_digest(digest)}"

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except redis.RedisError as exc:
            raise PayloadStoreUnavailable(
                "the durable store", f"{type(exc).__name__}: {exc}"
            ) from exc

    def put(self, digest: str, data: bytes) -> None:
        """SET with the blob lifetime."""
        with self._mapped():
            self.client.set(self.key(digest), data, ex=self.ttl_s)

    def get(self, digest: str) -> bytes | None:
        """The payload's bytes, or None."""
        with self._mapped():
            data = self.client.get(self.key(digest))
        return None if data is None else _intact(digest, bytes(data))  # type: ignore[arg-type]

    def delete(self, digest: str) -> None:
        """Remove the key."""
        with self._mapped():
            self.client.delete(self.key(digest))

    def delete_many(self, digests: Sequence[str]) -> None:
        """One DEL for all."""
        if digests:
            with self._mapped():
                self.client.delete(*(self.key(d) for d in digests))

    def sweep(self, older_than_s: float, referenced: Referenced | None = None) -> int:
        """Nothing: every payload expires after the blob lifetime by itself."""
        return 0

    def ping(self) -> None:
        """PING the durable store."""
        with self._mapped():
            self.client.ping()

    def close(self) -> None:
        """The client is the process's durable one: closed with the others."""


# --- from the settings ---------------------------------------------------------------


def payload_store(
    settings: Settings,
    client: Callable[[str], redis.Redis],
    storage: ObjectStorage | None = None,
    durable: redis.Redis | None = None,
    key_prefix: str | None = None,
) -> PayloadStore:
    """The backend ``OFA_PAYLOAD_STORE`` names (``shared/wiring.py:payload_store`` calls
    this with the process's clients): ``client`` makes a blocking Redis client from a
    URL (a pool's nodes), ``storage`` is the process's object-store client if it has
    one, ``durable`` its durable Redis client (for ``durable``); ``key_prefix``: what
    Redis payload keys start with (``Keys.payload``; default ``{OFA_KEY_PREFIX}payload:``)."""
    spec = settings.payload_store
    key_prefix = key_prefix or f"{settings.key_prefix}payload:"
    if spec == "local":
        return LocalPayloads(settings.payloads_path)
    if spec == "durable":
        if durable is None:
            raise ValueError("OFA_PAYLOAD_STORE=durable needs the durable Redis client")
        return DurablePayloads(durable, key_prefix=key_prefix, ttl_s=settings.blob_ttl_s)
    if is_object_url(spec):
        prefix = ObjectUrl.parse(spec, key_required=False)
        return ObjectPayloads(storage or ObjectStorage.from_settings(settings), prefix)
    urls = settings.payload_redis_urls if spec == "redis" else split_urls(spec)
    if not urls:
        raise ValueError("OFA_PAYLOAD_STORE=redis needs OFA_PAYLOAD_REDIS_URLS")
    return RedisPayloads(urls, key_prefix=key_prefix, ttl_s=settings.blob_ttl_s, client=client)
