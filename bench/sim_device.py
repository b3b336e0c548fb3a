"""A worker whose forward pass is a simulated accelerator: everything else is real
(Celery, Redis, the batcher, preprocessing, the host's staging of each batch).

The device runs one batch at a time and takes ``fixed + per_item * n`` seconds for a
batch of n, with the interpreter lock free meanwhile, as while a CUDA stream runs
and the host waits for its result. ``OFA_SIM_DEVICE_MS="5,1.1"`` (the default: about
OFA-Large in bf16 on one H100 at ~40% of peak) sets the two costs in milliseconds.
With ``OFA_SIM_DEVICE_LOG=PATH`` each batch is appended to PATH as one line, ``size
start end`` (wall-clock seconds), for the batch-size distribution and the device's
idle time (``bench/bench_device.py``).

    OFA_SIM_DEVICE_MS=8,2.5 python -m bench.sim_device
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import Any

from bench.instant_worker import ANSWER, run_worker

DEFAULT_MS = "5,1.1"


def device_costs(spec: str | None = None) -> tuple[float, float]:
    """(fixed, per item) seconds from ``OFA_SIM_DEVICE_MS`` ("fixed_ms,per_item_ms")."""
    fixed, per_item = (spec or os.environ.get("OFA_SIM_DEVICE_MS") or DEFAULT_MS).split(",")
    return float(fixed) / 1000, float(per_item) / 1000


class SimDevice:
    """One batch at a time, ``fixed + per_item * n`` seconds each, asleep meanwhile."""

    def __init__(self, fixed_s: float, per_item_s: float, log: str | None = None) -> None:
        self.fixed_s, self.per_item_s = fixed_s, per_item_s
        self._lock = threading.Lock()
        self._log = open(log, "a", buffering=1) if log else None  # noqa: SIM115 (process-long)

    def run(self, n: int) -> None:
        """Occupy the device for a batch of ``n`` items; log the batch."""
        with self._lock:
            start = time.time()
            end_at = time.perf_counter() + self.fixed_s + self.per_item_s * n
            while (left := end_at - time.perf_counter()) > 0:
                time.sleep(left)
            end = time.time()
            if self._log is not None:
                self._log.write(f"{n} {start:.6f} {end:.6f}\n")


def _sim_loader(real: Any) -> Any:
    def load(*args: Any, **kwargs: Any) -> Any:
        from worker.ofa.entail import Prediction

        entailer = real(*args, **kwargs)
        device = SimDevice(*device_costs(), os.environ.get("OFA_SIM_DEVICE_LOG"))

        def score(batch: Sequence[Any]) -> list[Prediction]:
            entailer.upload(batch)  # the host's share: pixels into the staging buffer
            device.run(len(batch))
            return [Prediction("entailment", "yes", dict(ANSWER)) for _ in batch]

        entailer.score = score
        return entailer

    return load


def main() -> None:
    import worker.runtime

    worker.runtime.load_entailer = _sim_loader(worker.runtime.load_entailer)  # type: ignore[assignment]
    run_worker("simdevice")


if __name__ == "__main__":
    main()
