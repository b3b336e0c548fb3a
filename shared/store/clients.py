"""The Redis clients a process has, and the one shape every store is built in.

``shared/wiring.py`` makes the clients from the settings (URLs, Sentinel, timeouts)
and builds every store with ``Store(settings, keys, clients)``; a process has blocking
clients, asyncio ones, or both. A store asked for a kind of client its process was
not given fails at that first use, naming the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel

from shared.keys import Keys
from shared.settings import Settings


@dataclass(frozen=True)
class SyncRedis:
    """Blocking clients (workers, coordinator, enqueueing from the API's thread pool).
    ``cache`` is ``durable`` itself when both roles share one server."""

    durable: redis.Redis
    cache: redis.Redis

    def close(self) -> None:
        """Close both connection pools (and their Sentinels' connections)."""
        for client in {id(c): c for c in (self.durable, self.cache)}.values():
            client.close()
            pool = client.connection_pool
            if isinstance(pool, redis.sentinel.SentinelConnectionPool):
                pool.sentinel_manager.close()


@dataclass(frozen=True)
class AsyncRedis:
    """Asyncio clients (the API's request handlers)."""

    durable: aioredis.Redis
    cache: aioredis.Redis

    async def aclose(self) -> None:
        """Close both connection pools (and their Sentinels' connections)."""
        for client in {id(c): c for c in (self.durable, self.cache)}.values():
            await client.aclose()
            pool = client.connection_pool
            if isinstance(pool, aiosentinel.SentinelConnectionPool):
                await pool.sentinel_manager.aclose()


class MissingClientError(RuntimeError):
    """A store was asked for a kind of Redis client its process was not given."""


@dataclass(frozen=True)
class Clients:
    """Whatever Redis clients the process has: ``blocking``, ``asyncio``, or both."""

    blocking: SyncRedis | None = None
    asyncio: AsyncRedis | None = None


class Store:
    """The base of every store: ``Store(settings, keys, clients)``. ``sync`` and ``aio``
    are the process's blocking and asyncio clients (durable and cache)."""

    def __init__(self, settings: Settings, keys: Keys, clients: Clients) -> None:
        self.settings = settings
        self.keys = keys
        self.clients = clients

    @property
    def sync(self) -> SyncRedis:
        """The blocking clients; ``MissingClientError`` when the process has none."""
        if self.clients.blocking is None:
            raise MissingClientError(f"{type(self).__name__} was built without blocking clients")
        return self.clients.blocking

    @property
    def aio(self) -> AsyncRedis:
        """The asyncio clients; ``MissingClientError`` when the process has none."""
        if self.clients.asyncio is None:
            raise MissingClientError(f"{type(self).__name__} was built without asyncio clients")
        return self.clients.asyncio
