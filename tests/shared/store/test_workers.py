"""Worker heartbeats, webhook outcome counts and the reaper's lock and log
(``shared/store/workers.py``) on the test Valkey."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.usefixtures("clean_inproc")


def test_a_beat_announces_a_worker_and_a_clean_stop_withdraws_it(stores, on_loop):
    registry = stores.workers
    registry.beat("w1:1", interval_s=5)
    registry.beat("w2:2", interval_s=5)
    assert sorted(registry.members(within_s=10)) == ["w1:1", "w2:2"]
    assert on_loop(lambda st: st.workers.acount()) == 2
    registry.withdraw("w1:1")
    assert registry.members(within_s=10) == ["w2:2"]
    assert on_loop(lambda st: st.workers.acount()) == 1


def test_silent_workers_are_forgotten_and_not_counted(stores, rdb, on_loop):
    registry = stores.workers
    now = time.time()
    rdb.zadd(registry.key, {"quiet:1": now - 40, "gone:2": now - 100})
    assert on_loop(lambda st: st.workers.acount()) == 0  # older than FRESH_S
    assert registry.members(within_s=60) == ["quiet:1"]
    registry.beat("live:3", interval_s=10)  # forgets those silent for six intervals
    assert {m.decode() for m in rdb.zrange(registry.key, 0, -1)} == {"quiet:1", "live:3"}
    assert 0 < rdb.ttl(registry.key) <= 100  # the set itself lapses with its workers


def test_workers_are_counted_per_model(inproc_settings, stores, on_loop):
    from shared import wiring

    stores.workers.beat("mine:1", interval_s=5)
    other = inproc_settings.model_copy(update={"model": "another-model"})
    theirs = wiring.stores(other, sync=stores.clients.blocking)
    assert theirs.workers.members(within_s=10) == []
    theirs.workers.beat("theirs:1", interval_s=5)
    assert stores.workers.members(within_s=10) == ["mine:1"]


def test_webhook_outcomes_are_counted(stores, on_loop):
    assert on_loop(lambda st: st.webhook_log.aread()) == {
        "delivered": 0,
        "retried": 0,
        "failed": 0,
    }
    for outcome in ("delivered", "delivered", "retried", "failed"):
        stores.webhook_log.record(outcome)
    assert on_loop(lambda st: st.webhook_log.aread()) == {
        "delivered": 2,
        "retried": 1,
        "failed": 1,
    }


def test_one_reaper_takes_each_period(stores):
    log = stores.reaper_log
    assert log.take_turn("a", period_s=0.3)
    assert not log.take_turn("b", period_s=0.3)  # someone else's pass this period
    time.sleep(0.3)  # the lock lasts nine tenths of the period
    assert log.take_turn("b", period_s=0.3)


def test_the_reaper_log_adds_counts_and_stamps_its_passes(stores, on_loop):
    counts, since = on_loop(lambda st: st.reaper_log.aread())
    assert counts == {"resent": 0, "poisoned": 0, "scans_resent": 0} and since is None
    stores.reaper_log.record({"resent": 2, "poisoned": 0})
    stores.reaper_log.record({"resent": 1, "scans_resent": 3})
    counts, since = on_loop(lambda st: st.reaper_log.aread())
    assert counts == {"resent": 3, "poisoned": 0, "scans_resent": 3}
    assert since is not None and 0 <= since < 5
