"""The stores' Lua scripts: each read once from ``lua/{name}.lua`` and run by its SHA.

A script is sent to a server once (``SCRIPT LOAD``) and called by ``EVALSHA`` after
that, about 40 bytes instead of its body. A server that does not know it (restarted,
``SCRIPT FLUSH``ed, or a replica just promoted by Sentinel) answers ``NOSCRIPT``; the
script is then loaded on that server and the call made again, so no caller sees it.

Pipelines are sent through ``Batch`` rather than redis-py's pipelines with registered
scripts: those ask ``SCRIPT EXISTS`` before every execution, one more round trip on
every submission and every chunk. A ``Batch`` sends ``EVALSHA`` straight away and, on
``NOSCRIPT``, loads the script and sends again only the commands that were refused
(with any ``WAITAOF`` after them, so that the acknowledgement covers them).

Scripts that share Lua functions (``lib.lua``: ``drop_payload``, ``for_each``) are sent
with the library in front (``Script(name, lib=True)``); each file declares its own
KEYS and ARGV in its header.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

# A script call's share of a long list (``Batch.each``): Valkey stays responsive.
ITEMS_PER_CALL = 64


def _source(name: str) -> str:
    return (resources.files("shared.store") / "lua" / f"{name}.lua").read_text("utf-8")


class Script:
    """One Lua script, read once, called by SHA on a blocking or asyncio client."""

    def __init__(self, name: str, lib: bool = False) -> None:
        self.name = name
        self.source = (_source("lib") + "\n" if lib else "") + _source(name)
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"Script({self.name!r})"

    def __call__(self, client: redis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run on a blocking client (loaded first if the server does not know it)."""
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            client.script_load(self.source)
            return client.evalsha(self.sha, len(keys), *keys, *args)

    async def acall(self, client: aioredis.Redis, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run on an asyncio client (loaded first if the server does not know it)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


_Call = tuple[Script | None, tuple[Any, ...]]


class Batch:
    """Commands sent in one round trip on a blocking or asyncio client (``execute`` or
    ``aexecute``); replies in order, a failed command's exception in its place.
    ``transaction``: MULTI/EXEC, for the calls of one script only (a server that lacks
    it refuses every call, so sending them again keeps them one transaction)."""

    def __init__(self, client: Any, transaction: bool = False) -> None:
        self.client = client
        self.transaction = transaction
        self._calls: list[_Call] = []

    def script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue one call of ``script``."""
        self._calls.append((script, (len(keys), *keys, *args)))

    def command(self, *args: Any) -> None:
        """Queue a plain command (``WAITAOF``, ``HMGET``...)."""
        self._calls.append((None, args))

    def each(self, script: Script, calls: Sequence[tuple[list[str], list[Any]]]) -> int:
        """Queue the (keys, argv) ``calls`` of a ``for_each`` script (lib.lua), at most
        ``ITEMS_PER_CALL`` to a command; returns how many commands (``each_reply``
        joins their replies)."""
        commands = 0
        for i in range(0, len(calls), ITEMS_PER_CALL):
            group = calls[i : i + ITEMS_PER_CALL]
            keys = [k for ks, _ in group for k in ks]
            argv: list[Any] = [len(group[0][0])]
            for _, args in group:
                argv += [len(args), *args]
            self.script(script, keys, argv)
            commands += 1
        return commands

    def execute(self) -> list[Any]:
        """Send the commands on the blocking client; returns their replies."""
        replies = self._send(self._calls)
        missing, again = self._refused(replies)
        if missing:
            for script in missing:
                self.client.script_load(script.source)
            for i, reply in zip(again, self._send([self._calls[i] for i in again]), strict=True):
                replies[i] = reply
        return replies

    async def aexecute(self) -> list[Any]:
        """Send the commands on the asyncio client; returns their replies."""
        replies = await self._asend(self._calls)
        missing, again = self._refused(replies)
        if missing:
            for script in missing:
                await self.client.script_load(script.source)
            sent = await self._asend([self._calls[i] for i in again])
            for i, reply in zip(again, sent, strict=True):
                replies[i] = reply
        return replies

    def _refused(self, replies: list[Any]) -> tuple[list[Script], list[int]]:
        """After ``NOSCRIPT``: the scripts the server lacks, and the commands to send
        again (the refused ones, and every ``WAITAOF`` after the first of them)."""
        refused = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if not refused:
            return [], []
        if self.transaction:
            assert len(refused) == len(self._calls), "a transaction holds one script's calls"
        missing = list({id(s): s for i in refused if (s := self._calls[i][0])}.values())
        again = [
            i
            for i in range(refused[0], len(self._calls))
            if i in refused or self._calls[i][1][:1] == ("WAITAOF",)
        ]
        return missing, again

    def _pipeline(self, calls: list[_Call]) -> Any:
        pipe = self.client.pipeline(transaction=self.transaction)
        for script, args in calls:
            if script is None:
                pipe.execute_command(*args)
            else:
                pipe.execute_command("EVALSHA", script.sha, *args)
        return pipe

    def _send(self, calls: list[_Call]) -> list[Any]:
        return list(self._pipeline(calls).execute(raise_on_error=False))

    async def _asend(self, calls: list[_Call]) -> list[Any]:
        return list(await self._pipeline(calls).execute(raise_on_error=False))


def each_reply(replies: Sequence[Any]) -> list[Any]:
    """The items' replies from the replies of ``Batch.each``'s commands (an error reply
    raises: it stands for all of that command's items)."""
    out: list[Any] = []
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
        out.extend(reply)
    return out
