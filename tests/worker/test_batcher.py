"""The dynamic batcher groups concurrent submissions and reports failures to each."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from worker.batcher import BatchCost, Batcher


def test_concurrent_items_share_batches():
    sizes: list[int] = []
    b: Batcher[int, int] = Batcher(
        lambda xs: [x * 2 for x in xs],
        max_batch=8,
        max_wait_s=0.05,
        on_batch=lambda n, _: sizes.append(n),
    )
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda x: b.submit(x).result(timeout=5), range(32)))
    b.close()
    assert results == [x * 2 for x in range(32)]
    assert sum(sizes) == 32 and max(sizes) <= 8 and len(sizes) < 32


def test_max_wait_bounds_latency_of_a_lone_item():
    b: Batcher[int, int] = Batcher(lambda xs: list(xs), max_batch=64, max_wait_s=0.05)
    start = time.monotonic()
    assert b.submit(7).result(timeout=5) == 7
    assert time.monotonic() - start < 1.0
    b.close()


def test_failure_reaches_every_waiter():
    gate = threading.Event()

    def boom(xs):
        gate.wait(1)
        raise RuntimeError("device lost")

    b: Batcher[int, int] = Batcher(boom, max_batch=4, max_wait_s=0.2)
    futures = [b.submit(i) for i in range(3)]
    gate.set()
    for f in futures:
        with pytest.raises(RuntimeError, match="device lost"):
            f.result(timeout=5)
    b.close()


def test_interactive_items_go_before_waiting_bulk_items():
    order: list[int] = []
    gate = threading.Event()

    def run(xs):
        gate.wait(2)
        order.extend(xs)
        return list(xs)

    b: Batcher[int, int] = Batcher(run, max_batch=1, max_wait_s=0)
    first = b.submit(0, priority=1)  # occupies the batcher while the rest queue up
    time.sleep(0.05)
    bulk = [b.submit(i, priority=1) for i in range(1, 4)]
    interactive = b.submit(99, priority=0)
    gate.set()
    for f in [first, *bulk, interactive]:
        f.result(timeout=5)
    b.close()
    assert order[0] == 0 and order[1] == 99


def test_items_submitted_together_keep_their_order_and_priority():
    """``submit_many`` queues a chunk's items in one go: each gets its own result, in
    order, and an interactive item submitted after them still goes first."""
    order: list[int] = []
    gate = threading.Event()

    def run(xs):
        gate.wait(2)
        order.extend(xs)
        return [x * 10 for x in xs]

    b: Batcher[int, int] = Batcher(run, max_batch=4, max_wait_s=0)
    first = b.submit(0, priority=1)  # occupies the batcher while the rest queue up
    time.sleep(0.05)
    bulk = b.submit_many(list(range(1, 10)), priority=1)
    assert b.submit_many([], priority=1) == []
    interactive = b.submit_many([99], priority=0)
    gate.set()
    assert [f.result(timeout=5) for f in bulk] == [x * 10 for x in range(1, 10)]
    assert interactive[0].result(timeout=5) == 990 and first.result(timeout=5) == 0
    b.close()
    assert order[:2] == [0, 99] and order[2:] == list(range(1, 10))


def test_interactive_batch_does_not_wait_for_bulk_items():
    batches: list[list[int]] = []
    gate = threading.Event()

    def run(xs):
        gate.wait(2)
        batches.append(list(xs))
        return list(xs)

    b: Batcher[int, int] = Batcher(run, max_batch=8, max_wait_s=0.01)
    blocker = b.submit(0, priority=1)  # its batch is running (held at the gate)
    time.sleep(0.1)
    bulk = [b.submit(i, priority=1) for i in range(1, 4)]
    urgent = b.submit(100, priority=0)
    gate.set()
    for f in [blocker, *bulk, urgent]:
        f.result(timeout=5)
    b.close()
    assert [100] in batches  # ran alone, not padded out with the waiting bulk items


def test_bulk_batches_are_cut_to_the_budget_while_interactive_work_is_about():
    batches: list[list[int]] = []

    def run(xs):
        time.sleep(0.01 * len(xs))  # 10 ms an item
        batches.append(list(xs))
        return list(xs)

    b: Batcher[int, int] = Batcher(run, max_batch=16, max_wait_s=0.05, bulk_budget_s=0.03)
    # No interactive work yet: bulk batches take all they can.
    assert all(f.result(timeout=5) == i for i, f in enumerate([b.submit(i, 1) for i in range(16)]))
    assert max(len(x) for x in batches) == 16 and b.bulk_limit() == 16
    # An interactive item arrives: bulk batches now fit the 30 ms budget (3 items).
    b.submit(100, priority=0).result(timeout=5)
    assert b.bulk_limit() <= 3
    batches.clear()
    for f in [b.submit(i, 1) for i in range(12)]:
        f.result(timeout=5)
    b.close()
    assert batches and max(len(x) for x in batches) <= 3


def test_batch_cost_separates_a_batch_fixed_cost_from_its_cost_per_item():
    cost = BatchCost()
    assert cost.items_within(0.05) is None
    for _ in range(10):  # 30 ms a batch plus 2 ms an item, at two sizes
        cost.add(1, 0.032)
        cost.add(16, 0.062)
    line = cost.line()
    assert line is not None
    assert line[0] == pytest.approx(0.030) and line[1] == pytest.approx(0.002)
    assert cost.items_within(0.05) == 10  # their average per item (~18 ms) allows 2
    assert cost.items_within(0.01) == 1  # the fixed cost alone is over: one at a time


def test_batch_cost_of_one_size_is_proportional():
    cost = BatchCost()
    for _ in range(5):
        cost.add(4, 0.04)
    assert cost.line() == pytest.approx((0.0, 0.01))
    assert cost.items_within(0.03) == 3


def test_interactive_batches_of_one_do_not_shrink_bulk_batches_by_their_fixed_cost():
    def run(xs):
        time.sleep(0.03 + 0.002 * len(xs))  # a GPU-like batch: mostly fixed cost
        return list(xs)

    b: Batcher[int, int] = Batcher(run, max_batch=16, max_wait_s=0.05, bulk_budget_s=0.05)
    for _ in range(3):
        for f in [b.submit(i, 1) for i in range(16)]:  # a bulk batch of 16
            f.result(timeout=5)
        b.submit(100, priority=0).result(timeout=5)  # an interactive batch of one
    # ~30 ms fixed + 2 ms an item fits ~10 items in 50 ms; charged per item, the
    # batches of one (32 ms an item) would have cut bulk batches to one or two.
    assert 6 <= b.bulk_limit() <= 12
    b.close()
