"""Settings: safe production defaults, consistent Celery limits."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.settings import Settings


def test_production_refuses_missing_secrets(monkeypatch):
    monkeypatch.chdir("/")
    with pytest.raises(ValidationError, match=r"production needs OFA_REDIS_URL"):
        Settings(environment="production")
    # Flower's password is Flower's alone: the other components start without it, and
    # Flower refuses to (shared/cli/serve.py:cmd_flower, tests/shared/cli/test_serve.py).
    assert Settings(environment="production", redis_url="redis://r:6379/0").flower_password is None


def test_production_refuses_weak_keys():
    with pytest.raises(ValidationError, match="at least 24"):
        Settings(
            environment="production",
            redis_url="redis://r:6379/0",
            api_keys="short",
            flower_password="x" * 30,
        )


def test_production_accepts_complete_config():
    s = Settings(
        environment="production",
        redis_url="redis://r:6379/0",
        api_keys="k" * 32 + "," + "j" * 32,
        flower_password="x" * 30,
    )
    assert len(s.api_keys) == 2


def test_visibility_timeout_must_exceed_hard_limit():
    with pytest.raises(ValidationError, match="visibility_timeout_s"):
        Settings(task_time_limit_s=100, task_soft_time_limit_s=50, visibility_timeout_s=100)


def test_env_lists_and_defaults(monkeypatch):
    monkeypatch.setenv("OFA_URL_ALLOW_HOSTS", "Images.Intranet, 10.1.0.0/16")
    s = Settings()
    assert s.url_allow_hosts == ["images.intranet", "10.1.0.0/16"]
    assert s.model == "iic/ofa_visual-entailment_snli-ve_large_en"
    assert s.max_upload_bytes > 0 and s.max_pixels > 0  # limits on by default


def test_startup_objects_leave_the_collectors_view():
    """What a process holds once started is frozen: full collections stop walking it."""
    import gc
    import warnings

    from shared.wiring import freeze_startup_objects

    # Garbage earlier tests left (a test client's socket the collector has not reached
    # yet) is collected first: its ResourceWarning belongs to that test, not to this one.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    held = [[] for _ in range(100)]  # containers: objects the collector tracks
    ids = {id(x) for x in held}
    assert sum(id(o) in ids for o in gc.get_objects()) == 100
    freeze_startup_objects()
    try:
        assert sum(id(o) in ids for o in gc.get_objects()) == 0  # out of every collection
    finally:
        gc.unfreeze()


def test_a_worker_holds_four_batches_of_interactive_messages_unless_told(monkeypatch):
    monkeypatch.delenv("OFA_WORKER_THREADS", raising=False)
    monkeypatch.delenv("OFA_INTERACTIVE_PREFETCH", raising=False)
    monkeypatch.delenv("OFA_BATCH_SIZE", raising=False)
    assert Settings().interactive_prefetch == 64  # 4 x the default batch of 16
    assert Settings(batch_size=48).interactive_prefetch == 192  # a GPU host's batches
    monkeypatch.setenv("OFA_INTERACTIVE_PREFETCH", "24")
    assert Settings(batch_size=48).interactive_prefetch == 24


def test_worker_threads_is_a_deprecated_alias_of_interactive_prefetch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The old name still sets the prefetch, and says once that it is deprecated."""
    from shared import settings as module

    monkeypatch.delenv("OFA_INTERACTIVE_PREFETCH", raising=False)
    monkeypatch.setenv("OFA_WORKER_THREADS", "20")
    monkeypatch.setattr(module, "_warned", set())
    with caplog.at_level("WARNING", logger="shared.settings"):
        assert Settings(batch_size=48).interactive_prefetch == 20
        assert Settings(batch_size=48).interactive_prefetch == 20
    said = [r.getMessage() for r in caplog.records if "OFA_WORKER_THREADS" in r.getMessage()]
    assert said == [
        "OFA_WORKER_THREADS is deprecated: set OFA_INTERACTIVE_PREFETCH instead (same meaning)"
    ]
