"""Running one job: the domain logic behind the Celery task.

Redelivered jobs (a worker died, the message came back) find the verdict in the
cache and finish without computing again. Input the model can never accept fails the
job at once; anything else propagates for the task to retry.
"""

from __future__ import annotations

import logging

from shared.errors import BadInputError
from shared.messages import EntailTask, ScanStatus, Verdict
from worker.runtime import Runtime, make_verdict

logger = logging.getLogger(__name__)


def fail(rt: Runtime, msg: EntailTask, error: str) -> None:
    """Fail the job for good; the next identical submission may try again."""
    rt.jobs.fail(msg.job_id, msg.key, error)
    logger.info("job %s failed: %s", msg.job_id, error)


def run_job(rt: Runtime, msg: EntailTask) -> Verdict | None:
    """Compute (or find) the verdict for one job and record it; None when the job
    failed. Scan jobs yield to interactive ones in the batcher and are dropped when
    their scan is cancelled."""
    if msg.scan_id and rt.scans.status(msg.scan_id) == ScanStatus.CANCELLED:
        fail(rt, msg, "scan cancelled")
        return None
    cached, blob = rt.jobs.start(msg.job_id, msg.key)
    if cached is not None:
        rt.jobs.succeed(msg.job_id, msg.key, cached, cached=True)
        return Verdict.model_validate_json(cached)
    if blob is None:
        fail(rt, msg, "the image expired before a worker could take the job")
        return None
    try:
        prepared = rt.entailer.prepare(blob, msg.text, msg.premise)
    except BadInputError as exc:
        fail(rt, msg, f"{exc.title}: {exc.detail}")
        return None
    priority = 1 if msg.bulk else 0
    prediction = rt.batcher.submit(prepared, priority).result(
        timeout=rt.settings.task_soft_time_limit_s
    )
    verdict = make_verdict(prediction, rt.model_tag, msg.key)
    rt.jobs.succeed(msg.job_id, msg.key, verdict, cached=False)
    return verdict
