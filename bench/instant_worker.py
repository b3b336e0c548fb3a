"""A worker whose model answers instantly: everything else is real (Celery, Redis, the
batcher, preprocessing). For measuring the plumbing around the model, the ceiling a
GPU worker would hit: ``python -m bench.instant_worker`` takes the same
settings as ``ofa-entail worker``."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from shared.cli.serve import celery_worker_argv
from shared.settings import get_settings
from shared.wire import queue_name

ANSWER = {"entailment": 0.6, "contradiction": 0.1, "neutral": 0.3}


def _instant_loader(real: Any) -> Any:
    def load(*args: Any, **kwargs: Any) -> Any:
        from worker.ofa.entail import Prediction

        entailer = real(*args, **kwargs)

        def score(batch: Sequence[Any]) -> list[Prediction]:
            # The host's share of a GPU batch stays: the pixels stacked into the staging
            # buffer (normalisation and the network run on the device).
            entailer.upload(batch)
            return [Prediction("entailment", "yes", dict(ANSWER)) for _ in batch]

        entailer.score = score
        return entailer

    return load


def run_worker(name: str) -> None:
    """Run a Celery worker (named ``name``) as ``ofa-entail worker`` would, in this
    process, with whatever model loader the caller has put in place."""
    settings = get_settings()
    # Celery's consumer takes the interactive queue (run in groups: worker/groups.py);
    # the bulk queue has its own consumer in the worker (worker/bulk.py).
    queues = [queue_name(*settings.model_tag)]
    argv = celery_worker_argv("worker.app:app", queues, settings.interactive_prefetch, name, False)
    from celery.__main__ import main as celery_main

    sys.argv = ["celery", *argv[3:]]
    celery_main()


def main() -> None:
    import worker.runtime

    worker.runtime.load_entailer = _instant_loader(worker.runtime.load_entailer)  # type: ignore[assignment]
    run_worker("instant")


if __name__ == "__main__":
    main()
