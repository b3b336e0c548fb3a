"""The one place that builds things from ``Settings``: Redis clients, the URL policy,
the key names, and the record stores on top of them (``stores``).

Every Redis client here has connect and read timeouts and a health check, so a
restarted server costs a reconnect, not a hang. The embedded server's URL (written by
``ofa-entail up``) is resolved once, in ``redis_urls``.

Either URL may name Sentinels instead of a server (``parse_sentinel_url``):
``sentinel://[user:password@]h1:26379,h2:26379,h3:26379/mymaster[/db]``, with
``?sentinel_username=...&sentinel_password=...`` when the Sentinels themselves ask for a
password. Every client is then one of redis-py's Sentinel-managed ones: each new
connection asks the Sentinels for the current primary, and a connection that finds a
dead or demoted primary (refused, reset, ``READONLY``, a replica's unblock) is dropped,
so the next command reconnects to whichever server was promoted; no process restarts.
The broker gets the same Sentinels in kombu's form (``celery_broker``).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from shared.fetch import UrlPolicy
from shared.keys import Keys
from shared.objects import BucketPolicy, ObjectStorage
from shared.payloads import PayloadStore
from shared.payloads import payload_store as _payload_store
from shared.settings import Settings
from shared.store.apikeys import ApiKeyStore
from shared.store.clients import AsyncRedis, Clients, SyncRedis
from shared.store.job_reads import JobReads
from shared.store.jobs import JobStore
from shared.store.limits import RateLimiter
from shared.store.reaping import JobReaping
from shared.store.scans import ScanStore
from shared.store.webhooks import WebhookSlots
from shared.store.workers import ReaperLog, WebhookLog, WorkerRegistry

__all__ = ["AsyncRedis", "Clients", "Stores", "SyncRedis", "payload_store", "stores"]

CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
HEALTH_CHECK_S = 30
EMBEDDED_URL_FILE = "redis.url"
SENTINEL_SCHEME = "sentinel"
SENTINEL_PORT = 26379
# Sentinels answer from memory: a Sentinel that takes longer than this is skipped for
# the next one, so one lost Sentinel host costs a client at most this per reconnect.
SENTINEL_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed ``sentinel://`` URL: where the Sentinels are, the name they monitor the
    primary under, the database, the credentials for the primary (the role's ACL user)
    and, if the Sentinels ask for one, theirs."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None

    def primary_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the primary (database and credentials)."""
        out: dict[str, Any] = {"db": self.db}
        if self.username:
            out["username"] = self.username
        if self.password:
            out["password"] = self.password
        return out

    def sentinel_kwargs(self) -> dict[str, Any]:
        """Connection arguments for the Sentinels themselves (timeouts, credentials)."""
        out: dict[str, Any] = {
            "socket_connect_timeout": SENTINEL_TIMEOUT_S,
            "socket_timeout": SENTINEL_TIMEOUT_S,
        }
        if self.sentinel_username:
            out["username"] = self.sentinel_username
        if self.sentinel_password:
            out["password"] = self.sentinel_password
        return out


def _host_port(item: str, url: str) -> tuple[str, int]:
    """``host[:port]`` or ``[v6]:port`` of one Sentinel."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"a Sentinel without a host in {redact(url)}")
    try:
        return host, int(port) if port else SENTINEL_PORT
    except ValueError:
        raise ValueError(f"bad Sentinel port {port!r} in {redact(url)}") from None


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The Sentinels a ``sentinel://`` URL names; None for any other URL (``redis://``,
    ``rediss://``, ``unix://``: redis-py reads those itself). Raises ``ValueError`` for a
    Sentinel URL without hosts or master name, or with an unknown option."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    sentinels = tuple(_host_port(h.strip(), url) for h in hosts.split(",") if h.strip())
    if not sentinels:
        raise ValueError(f"no Sentinel hosts in {redact(url)}")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError(f"a Sentinel URL names its master: .../mymaster[/db], not {redact(url)}")
    if len(path) == 2 and not path[1].isdigit():
        raise ValueError(f"bad database {path[1]!r} in {redact(url)}")
    options = dict(parse_qsl(parts.query))
    unknown = set(options) - {"sentinel_username", "sentinel_password"}
    if unknown:
        raise ValueError(f"unknown Sentinel URL options {sorted(unknown)} in {redact(url)}")
    return SentinelUrl(
        sentinels=sentinels,
        master=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(user) or None,
        password=unquote(password) or None,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
    )


def redact(url: str) -> str:
    """``url`` with its password (and a Sentinel password option) hidden, for errors
    and logs."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    netloc = f"{user}{':***' if colon else ''}{at}{hosts}"
    query = "&".join(f"{k}={'***' if 'password' in k else v}" for k, v in parse_qsl(parts.query))
    return parts._replace(netloc=netloc, query=query).geturl()


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """(broker URL, transport options to add) for Celery's Redis transport and result
    backend: a plain URL as it is; a Sentinel URL as kombu spells it, one
    ``sentinel://`` URL per Sentinel joined by ``;`` (each with the primary's
    credentials and database), the master name and the Sentinels' own arguments as
    options."""
    parsed = parse_sentinel_url(url)
    if parsed is None:
        return url, {}
    auth = ""
    if parsed.username or parsed.password:
        auth = f"{quote(parsed.username or '', safe='')}:{quote(parsed.password or '', safe='')}@"
    hosts = [f"[{h}]" if ":" in h else h for h, _ in parsed.sentinels]
    broker = ";".join(
        f"{SENTINEL_SCHEME}://{auth}{host}:{port}/{parsed.db}"
        for host, (_, port) in zip(hosts, parsed.sentinels, strict=True)
    )
    return broker, {"master_name": parsed.master, "sentinel_kwargs": parsed.sentinel_kwargs()}


def redis_urls(settings: Settings) -> tuple[str, str]:
    """(durable URL, cache URL): the configured ones, else the embedded server's."""
    durable = settings.redis_url
    if not durable:
        marker = settings.data_dir / EMBEDDED_URL_FILE
        if not marker.is_file():
            raise RuntimeError(
                "no Redis configured (OFA_REDIS_URL) and no embedded server running: "
                "start the service with `ofa-entail up`"
            )
        durable = marker.read_text().strip()
    return durable, settings.cache_redis_url or durable


_TIMEOUTS: dict[str, Any] = {
    "socket_connect_timeout": CONNECT_TIMEOUT_S,
    "socket_timeout": READ_TIMEOUT_S,
    "health_check_interval": HEALTH_CHECK_S,
}
# A command whose connection failed is sent again on a new one (asking the Sentinels
# again) this many times, waiting ~0.1, 0.2, 0.4 s: a connection the old primary closed
# costs a retry, not an error. redis-py sets this on the clients ``from_url`` builds,
# but a Sentinel-managed pool's connections get no retry unless told.
RETRIES = 3


def _retry_backoff() -> ExponentialWithJitterBackoff:
    return ExponentialWithJitterBackoff(cap=1.0, base=0.1)


class _SentinelConnection(redis.sentinel.SentinelManagedConnection):
    """redis-py's Sentinel-managed connection, asking for the primary on every connect.

    redis-py asks the Sentinels only when a pool hands out a closed connection; a
    command that fails mid-way (the old primary closed it, or answered ``READONLY``)
    reconnects inside its retry to the address it had, the old primary, so every retry
    fails the same way. Here each socket connect asks first."""

    def _connect(self) -> Any:
        if self.connection_pool.is_master:
            self.host, self.port = self.connection_pool.get_master_address()
        return super()._connect()


class _AsyncSentinelConnection(aiosentinel.SentinelManagedConnection):
    """``_SentinelConnection`` for asyncio clients."""

    async def _connect(self) -> None:
        if self.connection_pool.is_master:
            self.host, self.port = await self.connection_pool.get_master_address()
        await super()._connect()


def sync_client(url: str) -> redis.Redis:
    """A blocking client on ``url``: one server, or the primary the Sentinels name."""
    retry = Retry(_retry_backoff(), RETRIES)
    parsed = parse_sentinel_url(url)
    if parsed is None:
        return redis.Redis.from_url(url, retry=retry, **_TIMEOUTS)
    sentinels = redis.sentinel.Sentinel(
        parsed.sentinels, sentinel_kwargs=parsed.sentinel_kwargs(), retry=retry, **_TIMEOUTS
    )
    return sentinels.master_for(
        parsed.master,
        redis.Redis,
        connection_class=_SentinelConnection,
        **parsed.primary_kwargs(),
    )


def async_client(url: str) -> aioredis.Redis:
    """An asyncio client on ``url``: one server, or the primary the Sentinels name."""
    retry = AsyncRetry(_retry_backoff(), RETRIES)
    parsed = parse_sentinel_url(url)
    if parsed is None:
        return aioredis.Redis.from_url(url, retry=retry, **_TIMEOUTS)
    sentinels = aiosentinel.Sentinel(
        parsed.sentinels, sentinel_kwargs=parsed.sentinel_kwargs(), retry=retry, **_TIMEOUTS
    )
    return sentinels.master_for(
        parsed.master,
        aioredis.Redis,
        connection_class=_AsyncSentinelConnection,
        **parsed.primary_kwargs(),
    )


def sync_redis(settings: Settings) -> SyncRedis:
    """Blocking durable and cache clients."""
    durable_url, cache_url = redis_urls(settings)
    durable = sync_client(durable_url)
    cache = durable if cache_url == durable_url else sync_client(cache_url)
    return SyncRedis(durable, cache)


def async_redis(settings: Settings) -> AsyncRedis:
    """Asyncio durable and cache clients."""
    durable_url, cache_url = redis_urls(settings)
    durable = async_client(durable_url)
    cache = durable if cache_url == durable_url else async_client(cache_url)
    return AsyncRedis(durable, cache)


def url_policy(settings: Settings, max_redirects: int | None = None) -> UrlPolicy:
    """Limits and allow-list for fetching URLs (images; callbacks pass no redirects)."""
    return UrlPolicy(
        timeout_s=settings.url_timeout_s,
        max_redirects=settings.url_max_redirects if max_redirects is None else max_redirects,
        max_bytes=settings.max_upload_bytes,
        allow_hosts=tuple(settings.url_allow_hosts),
    )


def object_storage(settings: Settings) -> ObjectStorage:
    """The object-store client (``OFA_S3_*``, ``OFA_OBJECT_TIMEOUT_S``): scans' manifests,
    images and results named by ``s3://``, ``gs://``, ``az://`` URLs."""
    return ObjectStorage.from_settings(settings)


def bucket_policy(settings: Settings) -> BucketPolicy:
    """The global allow-list of object URLs a request may name (``OFA_OBJECT_BUCKETS``)."""
    return BucketPolicy(settings.object_buckets)


def payload_store(
    settings: Settings,
    sync: SyncRedis | None = None,
    storage: ObjectStorage | None = None,
) -> PayloadStore:
    """Where images of unfinished jobs wait (``OFA_PAYLOAD_STORE``): a folder, an
    object-store prefix, a pool of Redis nodes, or the durable Redis (``sync``'s
    durable client, made here if not given). ``storage``: the process's object-store
    client, if it has one."""
    durable = None
    if settings.payload_store == "durable":
        durable = (sync or sync_redis(settings)).durable
    return _payload_store(
        settings,
        sync_client,
        storage=storage,
        durable=durable,
        key_prefix=keys(settings).payload(""),
    )


def keys(settings: Settings) -> Keys:
    """Redis key names under the configured prefix."""
    return Keys(settings.key_prefix)


@dataclass(frozen=True)
class Stores:
    """Every record store, on one process's clients (``stores``)."""

    clients: Clients
    jobs: JobStore  # jobs' state changes
    reads: JobReads  # jobs read, and the done channel
    reaping: JobReaping  # the reaper's look at jobs
    scans: ScanStore
    workers: WorkerRegistry
    reaper_log: ReaperLog
    webhook_slots: WebhookSlots
    webhook_log: WebhookLog
    apikeys: ApiKeyStore
    limiter: RateLimiter
    payloads: PayloadStore  # images of unfinished jobs (what ``jobs`` writes and removes)


def stores(
    settings: Settings,
    sync: SyncRedis | None = None,
    aio: AsyncRedis | None = None,
    payloads: PayloadStore | None = None,
) -> Stores:
    """Every store on the clients the process has (``sync``: blocking, ``aio``:
    asyncio; a store used through a kind it was not given raises
    ``MissingClientError``), and the payload store (``payload_store`` unless given).
    The only place that builds a store."""
    clients = Clients(sync, aio)
    k = keys(settings)
    payloads = payloads or payload_store(settings, sync)
    return Stores(
        clients=clients,
        payloads=payloads,
        jobs=JobStore(settings, k, clients, payloads),
        reads=JobReads(settings, k, clients),
        reaping=JobReaping(settings, k, clients),
        scans=ScanStore(settings, k, clients),
        workers=WorkerRegistry(settings, k, clients),
        reaper_log=ReaperLog(settings, k, clients),
        webhook_slots=WebhookSlots(settings, k, clients),
        webhook_log=WebhookLog(settings, k, clients),
        apikeys=ApiKeyStore(settings, k, clients),
        limiter=RateLimiter(settings, k, clients),
    )


def freeze_startup_objects() -> None:
    """Hide everything allocated so far (modules, the model, clients) from the cyclic
    garbage collector, once a process has started. A full collection otherwise walks
    them all and stops every thread meanwhile: measured here, ~105 ms in a worker (torch
    and the model loaded) and ~45 ms in the API; what showed as the slowest interactive
    requests during a scan, their job waiting that long to start."""
    gc.collect()
    gc.freeze()
