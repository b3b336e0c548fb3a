"""The shapes that cross process boundaries."""

from __future__ import annotations

from shared.models import CachedVerdict, JobStatus, cached_verdict_body
from shared.wire import EntailTask
from tests.helpers import VERDICT


def test_cached_verdict_body_is_a_cached_verdict():
    body = cached_verdict_body(VERDICT.model_dump_json().encode())
    parsed = CachedVerdict.model_validate_json(body)
    assert parsed.verdict == VERDICT and parsed.cached is True and parsed.status == "succeeded"


def test_task_message_round_trips_through_json():
    msg = EntailTask(job_id="j", key="k", model="m", revision="r", text="t", scan_id="s")
    assert EntailTask.model_validate(msg.model_dump()) == msg
    assert msg.bulk and not EntailTask(job_id="j", key="k", model="m", revision="r", text="t").bulk


def test_terminal_statuses():
    assert {s for s in JobStatus if s.finished} == {JobStatus.SUCCEEDED, JobStatus.FAILED}
