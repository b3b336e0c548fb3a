"""Webhook deliveries on a consumer of their own in the coordinator: a slow receiver
never delays a scan slice.

When deliveries ran as Celery tasks on the coordinator's threads, the ones that run
scan slices, a receiver that answered a byte every few seconds held a thread for as
long as it liked, and each redelivery after the visibility timeout took another:
four such deliveries stopped every scan (measured: another key's 40-row scan at 0
rows for a minute). So now:

- the ``ofa.webhooks`` queue has this consumer (a Celery consumer step, as
  ``worker/bulk.py`` adds the bulk queue to a GPU worker): its own channel, prefetch
  and ``OFA_WEBHOOK_THREADS`` threads, in the same ``ofa-entail coordinator`` process;
- one delivery ends within ``Settings.webhook_deadline_s`` and reads at most
  ``OFA_WEBHOOK_MAX_ANSWER_BYTES`` of the answer (``shared/fetch.py:post_json``);
- at most ``OFA_WEBHOOK_PER_HOST`` deliveries to one receiver run at a time across every
  coordinator (``shared/store/webhooks.py:WebhookSlots``); one to a receiver at its
  bound is sent again after a short pause rather than wait on a thread, and keeps its
  retry count.

A failed delivery is sent again after 1 s, 2 s, 4 s ... (at most 5 min), up to
``OFA_CALLBACK_MAX_RETRIES`` times, with the same delivery id. Messages sent again carry
Celery's ``eta`` and ``retries`` headers: this consumer holds one until its time (its
prefetch raised meanwhile, as Celery's consumer does), at most half a visibility
timeout at a stretch: a hold longer than the visibility timeout would see the message
come back while still held, so a longer wait is sent again, with the same ``eta``.

Like an ``acks_late`` task, a message is acknowledged once its outcome is recorded (a
delivery made, given up on, or its next try queued); a coordinator that dies leaves it
to the visibility timeout. Task events go out as Celery's would, so Flower lists
deliveries.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cache
from typing import Any, Literal

import redis

from shared import tracing, wiring
from shared.settings import Settings, get_settings
from shared.store import JobReads, ScanStore, WebhookLog, WebhookSlots, receiver_of
from shared.wire import TASK_JOB_WEBHOOK, TASK_SCAN_WEBHOOK, WEBHOOK_QUEUE
from worker.broker import Message
from worker.consumer_step import ThreadedConsumerStep
from worker.events import dropped, handed_back, received_event, task_event
from worker.scans.callback import CallbackFailed, deliver, deliver_job

logger = logging.getLogger(__name__)

# A delivery to a receiver at its bound tries again after a pause in this range (s):
# random, so the deliveries waiting for one receiver do not all come back at once.
BUSY_PAUSE_S = (1.0, 3.0)
MAX_BACKOFF_S = 300.0
# A delivery that found the store (Redis) unavailable tries again after this long (s).
STORE_PAUSE_S = 5.0

Kind = Literal["delivered", "nothing", "busy", "retry", "failed"]
# The outcomes /metrics counts (WebhookLog), by kind: a receiver at its bound or a
# vanished job is no delivery attempt, so neither is counted.
COUNTED: dict[str, str] = {"delivered": "delivered", "retry": "retried", "failed": "failed"}


@dataclass(frozen=True)
class Next:
    """A delivery's outcome and what becomes of its message: done, or (``busy`` and
    ``retry``) sent again after ``countdown`` seconds carrying ``retries``."""

    kind: Kind
    detail: str
    countdown: float = 0.0
    retries: int = 0

    @property
    def again(self) -> bool:
        """The message goes back on the queue."""
        return self.kind in ("busy", "retry")


class Webhooks:
    """What one delivery does: read what to send, take a slot at the receiver, POST it
    signed, and say what comes next."""

    def __init__(
        self,
        settings: Settings,
        reads: JobReads,
        scans: ScanStore,
        slots: WebhookSlots,
        log: WebhookLog | None = None,
    ):
        self.settings = settings
        self.reads = reads
        self.scans = scans
        self.slots = slots
        self.log = log
        # The image URLs' address checks, no redirects, and the delivery's own deadline
        # (post_json's deadline is the policy's timeout).
        self.policy = replace(wiring.url_policy(settings, 0), timeout_s=settings.webhook_deadline_s)

    def run(self, name: str, args: list[Any], kwargs: dict[str, Any], retries: int) -> Next:
        """The delivery a message of task ``name`` asks for (its outcome counted)."""
        if name == TASK_SCAN_WEBHOOK:
            outcome = self.scan(*args, retries=retries, **kwargs)
        elif name == TASK_JOB_WEBHOOK:
            outcome = self.job(*args, retries=retries, **kwargs)
        else:
            raise ValueError(f"the webhook queue carries no {name!r} tasks")
        counted = COUNTED.get(outcome.kind)
        if counted and self.log is not None:
            try:
                self.log.record(counted)
            except redis.RedisError as exc:  # a count lost, never the delivery's outcome
                logger.warning("webhook outcome not counted: %s", exc)
        return outcome

    def scan(self, scan_id: str, delivery_id: str = "", *, retries: int = 0) -> Next:
        """POST a finished scan's summary to its callback URL; records the outcome on
        the scan once delivered or given up."""
        summary = self.scans.summary(scan_id)
        secret = self._secret()
        if summary is None or not summary.callback_url or secret is None:
            return Next("nothing", "scan expired, or no callback or webhook secret")
        url = summary.callback_url
        # A message queued before scans had delivery ids: one derived from the scan,
        # the same on every retry.
        delivery_id = delivery_id or uuid.uuid5(uuid.NAMESPACE_URL, f"scan:{scan_id}").hex

        def post() -> None:
            deliver(
                summary,
                url,
                delivery_id,
                secret,
                self.policy,
                self.settings.webhook_max_answer_bytes,
            )

        outcome = self._attempt(f"scan {scan_id}", url, delivery_id, post, retries)
        if outcome.kind == "delivered":
            self.scans.callback_delivered(scan_id)
        elif outcome.kind == "failed":
            self.scans.callback_failed(scan_id, outcome.detail)
        return outcome

    def job(self, job_id: str, url: str, delivery_id: str, *, retries: int = 0) -> Next:
        """POST a finished job to a webhook its submitter gave."""
        job = self.reads.get(job_id)
        secret = self._secret()
        if job is None or secret is None:
            return Next("nothing", "job expired, or no webhook secret")

        def post() -> None:
            deliver_job(
                job, url, delivery_id, secret, self.policy, self.settings.webhook_max_answer_bytes
            )

        return self._attempt(f"job {job_id}", url, delivery_id, post, retries)

    def _secret(self) -> bytes | None:
        secret = self.settings.webhook_secret
        return None if secret is None else secret.get_secret_value().encode()

    def _attempt(
        self, what: str, url: str, delivery_id: str, post: Callable[[], None], retries: int
    ) -> Next:
        receiver = receiver_of(url)
        token = self.slots.take(receiver)
        if token is None:
            pause = random.uniform(*BUSY_PAUSE_S)
            return Next("busy", f"{receiver} at its bound", countdown=pause, retries=retries)
        try:
            post()
        except CallbackFailed as exc:
            if retries >= self.settings.callback_max_retries:
                logger.error("%s: webhook to %s failed for good: %s", what, url, exc)
                return Next("failed", str(exc))
            logger.warning("%s: webhook to %s failed (%s); retry %d", what, url, exc, retries + 1)
            backoff = min(2.0**retries, MAX_BACKOFF_S)
            return Next("retry", str(exc), countdown=backoff, retries=retries + 1)
        finally:
            self.slots.give_back(receiver, token)
        return Next("delivered", f"delivered {delivery_id} to {url}")


@cache
def webhooks() -> Webhooks:
    """The process's deliveries (Redis clients built once)."""
    settings = get_settings()
    stores = wiring.stores(settings, sync=wiring.sync_redis(settings))
    return Webhooks(settings, stores.reads, stores.scans, stores.webhook_slots, stores.webhook_log)


def run_traced(
    hooks: Webhooks,
    name: str,
    args: list[Any],
    kwargs: dict[str, Any],
    retries: int,
    headers: dict[str, Any],
) -> Next:
    """``hooks.run`` for a message with these ``headers``: a job's delivery continues the
    job's trace (an ``ofa.webhook`` span, a child of the worker's ``ofa.job``, whose
    context the POST carries on to the receiver) when tracing is on and it has one."""
    parent = headers.get(tracing.TRACEPARENT)
    if not parent or not tracing.on():
        return hooks.run(name, args, kwargs, retries)
    attributes = {"ofa.webhook.task": name, "ofa.webhook.retries": retries}
    with tracing.span("ofa.webhook", str(parent), attributes, kind="CLIENT"):
        outcome = hooks.run(name, args, kwargs, retries)
        tracing.set_attribute("ofa.webhook.outcome", outcome.kind)
    return outcome


def eta_of(headers: dict[str, Any]) -> float | None:
    """The wall-clock time (epoch seconds) a message may run from, if Celery's ``eta``
    header sets one."""
    eta = headers.get("eta")
    if not eta:
        return None
    when = datetime.fromisoformat(str(eta))
    if when.tzinfo is None:  # Celery writes UTC
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


class WebhookConsumer(ThreadedConsumerStep):
    """Consumes ``ofa.webhooks`` into ``OFA_WEBHOOK_THREADS`` threads of its own, beside
    the coordinator's Celery consumer (which runs scan slices)."""

    what = "webhook deliveries"

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, get_settings().webhook_threads, "webhook", **kwargs)
        tracing.configure(self.settings, "ofa-entail-coordinator")  # a job's delivery span
        self._channel: Any = None
        self._held = 0  # messages waiting for their eta (the event loop's alone)
        self._generation = 0  # a new channel per (re)start; held messages of an old one
        # went back to the queue when it closed

    def queue_name(self) -> str:
        """The webhook queue."""
        return WEBHOOK_QUEUE

    def _on_channel(self, channel: Any) -> None:
        webhooks()  # built here, once, before any thread needs it
        self._channel = channel
        self._generation += 1
        self._held = 0

    def _received(self, body: Any, message: Message) -> None:
        """On the event loop: announce the delivery, then hold it until its eta or hand
        it to a webhook thread."""
        headers = message.headers or {}
        received_event(self.c, headers)
        try:
            eta = eta_of(headers)
        except ValueError:
            eta = None  # an eta nobody can read: run it now rather than never
        if eta is not None and eta > time.time():
            self._hold(body, message, eta, self._generation)
            return
        self._start(body, message)

    def _hold(self, body: Any, message: Message, eta: float, generation: int) -> None:
        """Keep a message until ``eta`` (at most half a visibility timeout at a stretch),
        its prefetch slot given back meanwhile so it holds up no other delivery."""
        self._held += 1
        self._channel.basic_qos(0, self.prefetch + self._held, False)
        wait_s = min(eta - time.time(), self.settings.visibility_timeout_s / 2)
        self.c.timer.call_after(max(wait_s, 0.0), self._due, (body, message, eta, generation))

    def _due(self, body: Any, message: Message, eta: float, generation: int) -> None:
        """On the event loop, a held message's wait is over."""
        if generation != self._generation:
            return  # its channel closed meanwhile, putting it back on the queue
        self._held -= 1
        self._channel.basic_qos(0, self.prefetch + self._held, False)
        if eta > time.time() + 0.05:  # held for half a visibility timeout: send it again
            self._submit(self._send_again, body, message, eta)
            return
        self._start(body, message)

    def _start(self, body: Any, message: Message) -> None:
        self._submit(self._run, body, message)

    def _send_again(self, body: Any, message: Message, eta: float) -> None:
        """A fresh message with the same id, arguments, retries and ``eta``; then the
        old one acknowledged (its visibility timeout was running out)."""
        headers = message.headers or {}
        args, kwargs, _ = body
        self._publish(headers, args, kwargs, int(headers.get("retries") or 0), eta=eta)
        message.ack()

    def _publish(
        self,
        headers: dict[str, Any],
        args: list[Any],
        kwargs: dict[str, Any],
        retries: int,
        eta: float | None = None,
        countdown: float | None = None,
    ) -> None:
        self.c.app.send_task(
            str(headers.get("task")),
            args=args,
            kwargs=kwargs,
            task_id=str(headers.get("id") or uuid.uuid4().hex),
            queue=WEBHOOK_QUEUE,
            retries=retries,
            eta=None if eta is None else datetime.fromtimestamp(eta, UTC),
            countdown=countdown,
            ignore_result=True,
            # a retry stays in the job's trace
            **({"headers": carried} if (carried := tracing.carried(headers)) else {}),
        )

    def _run(self, body: Any, message: Message) -> None:
        """On a webhook thread: one delivery, then its message acknowledged once what
        comes next is queued."""
        headers = message.headers or {}
        task_id, name = str(headers.get("id", "")), str(headers.get("task"))
        start = time.monotonic()
        task_event(self.c, "task-started", task_id)
        retries = int(headers.get("retries") or 0)
        try:
            args, kwargs, _ = body  # Celery's protocol 2: (args, kwargs, embed)
            outcome = run_traced(webhooks(), name, args, kwargs, retries, headers)
        except redis.RedisError as exc:  # the store is away: try again later, same count
            logger.warning("webhook task %s[%s]: %s; again in a while", name, task_id, exc)
            outcome = Next("busy", f"the store is unavailable ({exc})", STORE_PAUSE_S, retries)
        except Exception as exc:  # a message no delivery can ever run: not retried
            logger.exception("webhook task %s[%s] failed", name, task_id)
            dropped(self.c, message, task_id, exc)
            return
        if outcome.again:
            try:
                self._publish(headers, args, kwargs, outcome.retries, countdown=outcome.countdown)
            except Exception as exc:  # the broker is away: the message goes back as it was
                logger.error("webhook task %s[%s] not queued again: %s", name, task_id, exc)
                try:
                    handed_back(self.c, message, task_id, requeue=True)
                except Exception as again:  # then the visibility timeout brings it back
                    logger.error("webhook task %s[%s] not handed back: %s", name, task_id, again)
                return
            message.ack()
            task_event(self.c, "task-retried", task_id, exception=outcome.detail, traceback="")
            return
        message.ack()
        task_event(
            self.c,
            "task-succeeded",
            task_id,
            result=f"{outcome.kind}: {outcome.detail}",
            runtime=time.monotonic() - start,
        )
