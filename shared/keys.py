"""Cache keys and Redis key names.

The verdict key is SHA-256 over a length-prefixed framing of every input the verdict
depends on (the image by its own SHA-256), so no two different inputs can frame to
the same bytes. Texts are
normalised first (``shared.text.pre_caption``): texts the model sees identically share
a key. Redis key names all live under one versioned prefix.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from shared.text import NORMALISER_VERSION, pre_caption

# Bump when the prompt templates or anything else feeding the model changes.
PROMPT_VERSION = "ve-prompt-1"
KEY_SCHEME = b"ofa-entail/verdict/2"


def _frame(h: hashlib._Hash, part: bytes) -> None:
    h.update(len(part).to_bytes(8, "big"))
    h.update(part)


def image_digest(image: bytes) -> bytes:
    """SHA-256 of the raw image bytes (32 bytes)."""
    return hashlib.sha256(image).digest()


def verdict_key(
    model_id: str,
    revision: str,
    image: bytes,
    text: str,
    premise: str | None = None,
    tenant: str | None = None,
) -> str:
    """Hex SHA-256 naming the verdict for these inputs under this model (and, with
    ``OFA_CACHE_SCOPE=key``, for this ``tenant``: the API key's id)."""
    return verdict_key_for_digest(model_id, revision, image_digest(image), text, premise, tenant)


def verdict_key_for_digest(
    model_id: str,
    revision: str,
    digest: bytes,
    text: str,
    premise: str | None = None,
    tenant: str | None = None,
) -> str:
    """The same key from the image's SHA-256 alone, so a scan row that carries (or whose
    URL last served) a known digest is looked up without downloading the image. A
    ``tenant`` is framed last, so keys without one are unchanged."""
    if len(digest) != 32:
        raise ValueError("an image digest is 32 bytes of SHA-256")
    h = hashlib.sha256()
    _frame(h, KEY_SCHEME)
    _frame(h, model_id.encode())
    _frame(h, revision.encode())
    _frame(h, f"{PROMPT_VERSION}/{NORMALISER_VERSION}".encode())
    _frame(h, digest)
    _frame(h, pre_caption(text).encode())
    if premise is None:
        _frame(h, b"\x00")  # absent premise, distinct from an empty one
    else:
        _frame(h, b"\x01" + pre_caption(premise).encode())
    if tenant is not None:
        _frame(h, b"tenant:" + tenant.encode())
    return h.hexdigest()


def job_key_matches(
    key: str,
    model_id: str,
    revision: str,
    image: bytes,
    text: str,
    premise: str | None,
    tenant: str | None = None,
) -> bool:
    """Whether ``key`` is the verdict key of a job's own fields and the exact bytes
    about to be scored: a worker asks before scoring, so a verdict is only ever stored
    under the digest of the bytes the model saw (a blob that does not hash to its
    job's key, however it came to be written, fails the job instead). The one place a
    worker derives a job's key: anything else a key comes to depend on (a tenant's
    private cache scope, say) is added here and in ``verdict_key_for_digest``."""
    return key == verdict_key(model_id, revision, image, text, premise, tenant)


def payload_name(key: str, job_id: str) -> str:
    """The name of a job's image in the payload store: its verdict key and its id, so
    each job has its own (ending one never removes another's) and a worker can check
    the bytes against the key."""
    return f"{key}.{job_id}"


@dataclass(frozen=True)
class Keys:
    """Redis key names, all under ``prefix`` (e.g. ``ofa:v1:``)."""

    prefix: str

    def verdict(self, key: str) -> str:
        """Cache store: the verdict JSON."""
        return f"{self.prefix}verdict:{key}"

    def payload(self, name: str) -> str:
        """A payload store on Redis (``durable``, or a pool's node): a job's image bytes,
        by ``payload_name``."""
        return f"{self.prefix}payload:{name}"

    def job(self, job_id: str) -> str:
        """Durable store: the job record (a hash)."""
        return f"{self.prefix}job:{job_id}"

    def job_hooks(self, job_id: str) -> str:
        """Durable store: webhooks to send when the job ends (a list of JSON)."""
        return f"{self.prefix}job:{job_id}:hooks"

    def inflight(self, key: str) -> str:
        """Durable store: the id of the job computing ``key`` right now."""
        return f"{self.prefix}inflight:{key}"

    def scan(self, scan_id: str) -> str:
        """Durable store: the scan record (a hash)."""
        return f"{self.prefix}scan:{scan_id}"

    def scan_lock(self, scan_id: str) -> str:
        """Durable store: held by the coordinator working on the scan."""
        return f"{self.prefix}scan:{scan_id}:lock"

    def url_meta(self, url_hash: str) -> str:
        """Cache store: ETag, Last-Modified and SHA-256 last seen at an image URL."""
        return f"{self.prefix}urlmeta:{url_hash}"

    def done_channel(self) -> str:
        """Pub/sub channel on which workers announce each finished job id."""
        return f"{self.prefix}done"

    def job_deadlines(self) -> str:
        """Durable store: sorted set of unfinished job ids by deadline (dispatch or lease)."""
        return f"{self.prefix}jobs:deadlines"

    def job_pending(self) -> str:
        """Durable store: sorted set of unfinished job ids by creation time."""
        return f"{self.prefix}jobs:pending"

    def job_pending_interactive(self) -> str:
        """Durable store: the interactive (not scan) jobs of ``job_pending``: what load
        shedding counts, so that scans' work never sheds another key's submissions."""
        return f"{self.prefix}jobs:pending:interactive"

    def held_bytes(self) -> str:
        """Durable store: a hash of the image bytes held for unfinished jobs, by class
        (``interactive_bytes``, ``bulk_bytes``): what admission sheds on besides counts."""
        return f"{self.prefix}jobs:held"

    def scans_of(self, owner: str) -> str:
        """Durable store: a hash of one API key's scans (scan id -> manifest bytes
        stored), for the per-key caps on concurrent scans and scan storage."""
        return f"{self.prefix}scans:of:{owner}"

    def catalogue(self, owner: str, name: str) -> str:
        """Durable store: a hash naming one API key's catalogue's last succeeded scan
        (``scan``), the baseline its next scan's changes are counted against."""
        return f"{self.prefix}catalogue:{owner}:{name}"

    def idempotency(self, owner: str, key_digest: str) -> str:
        """Durable store: one API key's ``Idempotency-Key`` (by its SHA-256): the
        request body's digest and, once created, the scan it started."""
        return f"{self.prefix}idem:{owner}:{key_digest}"

    def job_prefix(self) -> str:
        """The job keys' common prefix (for scripts that name another job)."""
        return f"{self.prefix}job:"

    def scan_deadlines(self) -> str:
        """Durable store: sorted set of scans not yet finalised, by deadline."""
        return f"{self.prefix}scans:deadlines"

    def reaper_lock(self) -> str:
        """Durable store: held by the one reaper acting this period."""
        return f"{self.prefix}reaper:lock"

    def reaper_stats(self) -> str:
        """Durable store: a hash of the reaper's counters and its last run."""
        return f"{self.prefix}stats:reaper"

    def batch_stats(self) -> str:
        """Durable store: a hash counting model passes and items (tests, benchmarks)."""
        return f"{self.prefix}stats:batches"

    def webhook_stats(self) -> str:
        """Durable store: a hash counting webhook deliveries by outcome (/metrics)."""
        return f"{self.prefix}stats:webhooks"

    def workers(self, model_id: str, revision: str) -> str:
        """Durable store: sorted set of workers serving a model, scored by heartbeat time."""
        return f"{self.prefix}workers:{model_id}@{revision}"

    def api_key(self, key_id: str) -> str:
        """Durable store: an API key's record (a hash: name, scopes, limits, SHA-256)."""
        return f"{self.prefix}apikey:{key_id}"

    def api_key_index(self) -> str:
        """Durable store: the set of every API key id ever created (revoked ones too)."""
        return f"{self.prefix}apikeys"

    def rate_bucket(self, who: str, bucket: str) -> str:
        """Durable store: a rate limit's theoretical arrival time (GCRA), in ms."""
        return f"{self.prefix}rate:{who}:{bucket}"
