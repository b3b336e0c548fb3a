"""The stores' Lua scripts: each file declares its KEYS and ARGV, is sent to a server
once and called by SHA after that, and a server that forgot it (restarted, flushed, a
replica just promoted) gets it again without the caller noticing."""

from __future__ import annotations

import re
from importlib import resources

import pytest
import redis

from shared.models import JobStatus, ScanCounts
from shared.store.scripts import ITEMS_PER_CALL, Script
from tests.helpers import VERDICT

pytestmark = pytest.mark.usefixtures("clean_inproc")

LUA = resources.files("shared.store") / "lua"


def commandstats(rdb: redis.Redis) -> dict[str, int]:
    stats = rdb.info("commandstats")
    return {
        name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
        for name in ("eval", "evalsha", "script|load", "script|exists")
    }


def test_every_script_names_its_keys_and_argv_in_its_header():
    for path in LUA.iterdir():
        if not path.name.endswith(".lua") or path.name == "lib.lua":
            continue
        text = path.read_text()
        header = [line for line in text.splitlines() if line.startswith("--")]
        body = "\n".join(line for line in text.splitlines() if not line.startswith("--"))
        assert header and header[0].startswith(f"-- {path.name}:"), path.name
        # The body names each KEYS[i] and ARGV[i] once, at the top; nowhere positional.
        used = set(re.findall(r"(?:KEYS|ARGV|keys|argv)\[(\d+)\]", body))
        for i in used:
            assert re.search(rf"(KEYS|ARGV|keys|argv)\[{i}\]", "\n".join(header)), (path, i)
        for line in body.splitlines():  # positions only where they get their names
            if re.search(r"\b(KEYS|ARGV|keys|argv)\[\d+\]", line):
                assert line.lstrip().startswith("local "), (path.name, line)


def test_scripts_are_sent_once_then_called_by_sha(stores, rdb: redis.Redis):
    jobs, reads = stores.jobs, stores.reads
    rdb.script_flush()
    before = commandstats(rdb)
    for i in range(5):
        job_id = jobs.create_or_join(f"sha{i}", b"img", "t", None).job_id
        jobs.start(job_id, f"sha{i}")
        jobs.succeed(job_id, f"sha{i}", VERDICT, cached=False)
    after = commandstats(rdb)
    assert after["eval"] == before["eval"]  # no script body sent with a call
    assert after["evalsha"] - before["evalsha"] >= 15
    # Loaded once each (create_or_join, start, finish), never asked about per call.
    assert after["script|load"] - before["script|load"] == 3
    assert after["script|exists"] == before["script|exists"]
    shas = [Script(n, lib=True).sha for n in ("create_or_join", "start", "finish")]
    assert rdb.script_exists(*shas) == [True, True, True]
    assert reads.get(job_id).status == JobStatus.SUCCEEDED  # type: ignore[union-attr]


def test_every_store_survives_a_script_flush(stores, rdb: redis.Redis, on_loop):
    """A server that lost its scripts (a restart, SCRIPT FLUSH, a promoted replica
    under Sentinel): each store's scripts are loaded again on first use, and the
    calls do what they would have done."""
    jobs, reaping, scans = stores.jobs, stores.reaping, stores.scans

    def flushed() -> None:
        rdb.script_flush()

    flushed()
    made = jobs.create_or_join_many([(f"f{i}", b"img", "t", None) for i in range(3)], "sf")
    assert all(c.created for c in made)
    flushed()
    started = jobs.start_many([(c.job_id, f"f{i}") for i, c in enumerate(made)])
    assert [s.action for s in started] == ["run"] * 3
    flushed()
    assert jobs.add_hook(made[0].job_id, "http://example.invalid/h")[0] == "added"
    flushed()
    hooks = jobs.succeed_many([(made[0].job_id, "f0", VERDICT)])
    assert [h.url for h in hooks[0]] == ["http://example.invalid/h"]
    flushed()
    assert jobs.fail(made[1].job_id, "f1", "broken") == []
    flushed()
    jobs.linger([("f0", made[0].job_id)])
    assert rdb.ttl(jobs.keys.job(made[0].job_id)) <= 60
    flushed()
    rdb.zadd(jobs.keys.job_deadlines(), {made[2].job_id: 1})
    assert jobs.claim_overdue(made[2].job_id)
    flushed()
    record = jobs.record(made[2].job_id)
    assert not reaping.claim_lost(made[2].job_id, {**record, "dispatches": "9"})
    flushed()
    assert reaping.lost_messages(lambda r: "no-such-queue", "no-such-hash", 0.0, ["x"]) == []
    flushed()
    jobs.discard(made[2].job_id, "f2")
    assert not rdb.exists(jobs.keys.job(made[2].job_id))
    flushed()
    queued = jobs.create_or_join("fc", b"img", "t", None).job_id
    flushed()
    cancelled = on_loop(lambda st: st.jobs.acancel(queued))
    assert cancelled is not None and cancelled[0] == "cancelled"

    flushed()
    scans.create("scan-f", 1, "/m", None, owner="k", stored_bytes=10)
    flushed()
    on_loop(lambda st: st.scans.aadmit("k"))
    token = scans.lock("scan-f", 5)
    assert token is not None
    flushed()
    assert scans.keep("scan-f", token, 5)
    flushed()
    scans.unlock("scan-f", token)
    assert scans.lock("scan-f", 5) is not None
    scans.finish("scan-f", ScanCounts(read=1, done=1))

    flushed()
    assert stores.webhook_slots.take("example.invalid:80") is not None


def test_a_long_transaction_is_sent_again_whole_after_a_flush(jobs, rdb: redis.Redis):
    """More jobs than one script call takes finish in one MULTI/EXEC; a server that
    lacks the script refuses every call in it, and all of them are sent again."""
    n = ITEMS_PER_CALL + 5
    made = jobs.create_or_join_many([(f"t{i}", b"img", "t", None) for i in range(n)])
    jobs.start_many([(c.job_id, f"t{i}") for i, c in enumerate(made)])
    rdb.script_flush()
    jobs.succeed_many([(c.job_id, f"t{i}", VERDICT) for i, c in enumerate(made)])
    statuses = [rdb.hget(jobs.keys.job(c.job_id), "status") for c in made]
    assert statuses == [b"succeeded"] * n


def test_the_rate_limiter_loads_its_script_again_after_a_flush(rdb, on_loop):
    from shared.store.apikeys import ALL_SCOPES, Caller, Limits

    who = Caller("flush", "flush", ALL_SCOPES, Limits(60, 2))
    rdb.script_flush()
    decision = on_loop(lambda st: st.limiter.charge(who, "miss"))
    assert decision is not None and decision.admitted
    assert rdb.script_exists(Script("gcra").sha) == [True]
