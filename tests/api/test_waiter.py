"""The API's job waiter keeps its subscription alive across a lost Redis host: a
subscription whose server stops answering (no reset, nothing to read: a vanished host,
here a proxy that stops forwarding) is probed, given up and made again, so the
announcements reach the waiting requests after a failover."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
import redis.asyncio as aioredis

from api.waiter import JobWaiter
from shared.store import AsyncRedis, Clients, DoneChannel
from shared.store import job_reads as job_reads_module


class FreezingProxy:
    """A TCP proxy to a Redis server whose open connections can be frozen: their bytes
    stop flowing both ways, nothing is closed, as when a host vanishes. Connections
    made after a freeze flow normally."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.frozen: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        for event in self.frozen:
            event.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        frozen = asyncio.Event()
        self.frozen.append(frozen)
        self.writers += [writer, up_writer]
        task = asyncio.current_task()
        assert task is not None
        self.tasks.append(task)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # swallowed, and never anything again
                dst.write(data)
                await dst.drain()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        """Stop serving, and close every connection (frozen ones included)."""
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self.server.wait_closed()


def test_a_silent_subscription_is_replaced(valkey: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(job_reads_module, "QUIET_S", 0.3)
    port = int(valkey.rsplit(":", 1)[1].split("/")[0])
    channel = "ofa:test:waiter-done"

    async def main() -> None:
        proxy = FreezingProxy(port)
        proxied = aioredis.Redis(port=await proxy.start(), socket_timeout=None)
        direct = aioredis.Redis.from_url(valkey)
        waiter = JobWaiter(DoneChannel(channel, Clients(asyncio=AsyncRedis(proxied, proxied))))
        try:
            first = waiter.register("job-1")
            await asyncio.sleep(0.2)  # subscribed
            await direct.publish(channel, "job-1 " + json.dumps(["status", "succeeded"]))
            assert await asyncio.wait_for(first, 2) == {"status": "succeeded"}

            proxy.freeze()  # the host is gone: the subscription hears nothing, ever
            second = waiter.register("job-2")
            await asyncio.sleep(1.5)  # past a PING and its unanswered wait: resubscribed
            await direct.publish(channel, "job-2 " + json.dumps(["status", "failed"]))
            assert await asyncio.wait_for(second, 2) == {"status": "failed"}
        finally:
            await waiter.close()
            await proxied.aclose()
            await direct.aclose()
            await proxy.close()

    asyncio.run(main())
