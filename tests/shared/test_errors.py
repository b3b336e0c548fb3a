"""The project's named errors (``shared/errors.py``): each carries the data a caller acts
on and says it in its message; every input error is a ``BadInputError`` with a title."""

from __future__ import annotations

import inspect

import pytest

from shared import errors
from shared.errors import (
    BadInputError,
    CheckpointError,
    CheckpointMismatchError,
    ManifestLineTooLongError,
    ModelDownloadError,
    OfaEntailError,
    OverloadedError,
    PayloadTooLargeError,
    QueueUnavailableError,
    ScanLimitError,
    ScansBusyError,
    UnsupportedConfigError,
)


def test_every_error_is_the_projects_own():
    classes = [c for _, c in inspect.getmembers(errors, inspect.isclass)]
    assert classes and all(issubclass(c, OfaEntailError) for c in classes)


def test_every_input_error_has_a_title_of_its_own():
    inputs = [
        c
        for _, c in inspect.getmembers(errors, inspect.isclass)
        if issubclass(c, BadInputError) and c is not BadInputError
    ]
    titles = [c.title for c in inputs]
    assert len(inputs) >= 9 and len(set(titles)) == len(titles)
    assert all(t and t != BadInputError.title for t in titles)
    err = errors.BadTextError("text is empty")
    assert (err.detail, str(err)) == ("text is empty", "text is empty")


def test_checkpoint_errors_name_the_file_and_what_was_expected():
    err = CheckpointError("/m/config.json", "missing")
    assert (err.path, err.detail, str(err)) == (
        "/m/config.json",
        "missing",
        "/m/config.json: missing",
    )
    mismatch = CheckpointMismatchError("/m", "encoder.w", "shape (2, 3), expected (3, 2)")
    assert isinstance(mismatch, CheckpointError) and mismatch.key == "encoder.w"
    assert str(mismatch) == "/m: tensor 'encoder.w': shape (2, 3), expected (3, 2)"
    config = UnsupportedConfigError("/m", "activation", "swish", "gelu or relu")
    assert (config.key, config.value) == ("activation", "swish")
    assert "activation='swish' is not supported (expected gelu or relu)" in str(config)


@pytest.mark.parametrize(("revision", "named"), [("v1", " (revision v1)"), (None, "")])
def test_a_download_failure_says_how_to_run_offline(revision, named):
    err = ModelDownloadError("iic/ofa", revision, "offline")
    assert (err.model_id, err.revision, err.reason) == ("iic/ofa", revision, "offline")
    assert str(err).startswith(f"could not download model 'iic/ofa'{named}: offline. ")
    assert "OFA_MODEL_DIR" in str(err) and "ofa-entail model tiny" in str(err)


def test_refusals_say_when_to_come_back():
    over = OverloadedError(12, 10, 5)
    assert (over.pending, over.limit, over.retry_after_s) == (12, 10, 5)
    assert over.detail.startswith("12 jobs are waiting (the limit is 10)")
    assert over.detail.endswith("retry in 5s") and str(over) == over.detail
    assert "3 scans are waiting" in OverloadedError(3, 2, 1, what="scans").detail
    busy = ScansBusyError(4, 4)
    assert (busy.active, busy.limit, busy.retry_after_s) == (4, 4, 60)
    assert busy.detail == "4 scans are running (the service's limit is 4); retry in 60s"
    limit = ScanLimitError("too many scans", retry_after_s=30)
    assert (limit.detail, limit.retry_after_s, str(limit)) == (
        "too many scans",
        30,
        "too many scans",
    )
    down = QueueUnavailableError("broker unreachable")
    assert (down.detail, str(down)) == ("broker unreachable", "broker unreachable")


def test_a_manifest_line_too_long_is_a_payload_too_large():
    err = ManifestLineTooLongError("line 1 is 70000 bytes")
    assert isinstance(err, PayloadTooLargeError) and isinstance(err, BadInputError)
    assert err.title != PayloadTooLargeError.title
