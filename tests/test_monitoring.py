"""The alerts and the dashboard that ship with the service: the PrometheusRule valid
(the operator's schema, vendored) and its rules checked and unit-tested by promtool
(each alert fired from synthetic series, none on a healthy service), each alert's
runbook section, every series the alerts and the dashboard's panels name exported by
the API's /metrics, and the values /metrics reads from the store."""

from __future__ import annotations

import copy
import http.server
import json
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import redis
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from api.app import create_app
from shared import wiring
from shared.store import WebhookSlots
from shared.wire import TASK_SCAN_WEBHOOK
from tests.helpers import API_KEY, strict

ROOT = Path(__file__).resolve().parent.parent
RULE_FILE = ROOT / "deploy" / "k8s" / "base" / "monitoring" / "alerts.yaml"
RULE_TESTS = ROOT / "tests" / "monitoring" / "alerts-test.yml"
SCHEMA = ROOT / "deploy" / "k8s" / "schemas" / "monitoring.coreos.com_v1_prometheusrule.json"
DASHBOARD = ROOT / "deploy" / "grafana" / "ofa-entail.json"
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"
RUNBOOK_BASE = "https://runbooks.example.com/ofa-entail/RUNBOOK.md"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("promtool")
    assert tool, "promtool is needed: Debian's prometheus package (make test installs it)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)


def rule() -> dict[str, Any]:
    return yaml.safe_load(RULE_FILE.read_text())


def alerts() -> dict[str, dict[str, Any]]:
    """Every alerting rule of the PrometheusRule, by name."""
    return {r["alert"]: r for g in rule()["spec"]["groups"] for r in g["rules"] if "alert" in r}


def rules_file(tmp_path: Path, groups: list[dict[str, Any]] | None = None) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file (what the operator mounts)."""
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups or rule()["spec"]["groups"]}))
    return path


# The operator's schema, read strictly (tests/test_k8s.py validates the rendered rule
# with it too). Not jsonschema.validate: that checks the schema first, and the CRD's one
# pattern (partial_response_strategy's, unused here) is Go's syntax, not Python's.
RULE_VALIDATOR = jsonschema.Draft202012Validator(strict(json.loads(SCHEMA.read_text())))


def test_the_rule_is_a_valid_prometheus_rule_in_the_base():
    RULE_VALIDATOR.validate(rule())
    wrong = rule()
    wrong["spec"]["groups"][0]["rules"][0]["for_"] = "5m"  # misspelt: the schema catches it
    with pytest.raises(jsonschema.ValidationError):
        RULE_VALIDATOR.validate(wrong)
    base = yaml.safe_load((RULE_FILE.parent.parent / "kustomization.yaml").read_text())
    assert "monitoring/alerts.yaml" in base["resources"]


def test_promtool_checks_the_rules(tmp_path):
    done = promtool("check", "rules", str(rules_file(tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in done.stdout
    broken = copy.deepcopy(rule()["spec"]["groups"])
    broken[0]["rules"][0]["expr"] = "max(ofa_jobs_overdue > 0"
    assert promtool("check", "rules", str(rules_file(tmp_path, broken))).returncode != 0


def expectations() -> list[dict[str, Any]]:
    return yaml.safe_load(RULE_TESTS.read_text())["tests"]


def test_every_alert_fires_in_a_unit_test_and_none_on_a_healthy_service():
    """The unit tests cover the rules: each alert expected to fire somewhere, and to be
    quiet in the healthy test."""
    fired: set[str] = set()
    for case in expectations():
        for check in case["alert_rule_test"]:
            if check["exp_alerts"]:
                fired.add(check["alertname"])
    assert fired == set(alerts())
    healthy = next(c for c in expectations() if c["name"] == "healthy")
    quiet = {c["alertname"] for c in healthy["alert_rule_test"] if not c["exp_alerts"]}
    assert quiet == set(alerts())


def with_fixed_annotations(rules_path: Path, tmp_path: Path) -> Path:
    """The unit tests, pointed at ``rules_path``, each expected alert given the rule's
    fixed annotations (the templated summary is the test file's own)."""
    by_name = alerts()
    tests = yaml.safe_load(RULE_TESTS.read_text())
    tests["rule_files"] = [str(rules_path)]
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            annotations = by_name[check["alertname"]]["annotations"]
            for alert in check["exp_alerts"]:
                got = alert.setdefault("exp_annotations", {})
                for name, text in annotations.items():
                    if "{{" not in text:
                        got.setdefault(name, text)
    path = tmp_path / "alerts-test.yml"
    path.write_text(yaml.safe_dump(tests))
    return path


def test_promtool_unit_tests_fire_each_alert(tmp_path):
    rules = rules_file(tmp_path)
    done = promtool("test", "rules", str(with_fixed_annotations(rules, tmp_path)))
    assert done.returncode == 0, done.stdout + done.stderr
    # The unit tests can fail: a threshold moved makes the healthy service alert.
    groups = copy.deepcopy(rule()["spec"]["groups"])
    for group in groups:
        for r in group["rules"]:
            if r.get("alert") == "OfaOldestPendingJobOld":
                r["expr"] = "max(ofa_oldest_pending_job_seconds) > 10"
    rules = rules_file(tmp_path, groups)
    done = promtool("test", "rules", str(with_fixed_annotations(rules, tmp_path)))
    assert done.returncode != 0 and "OfaOldestPendingJobOld" in done.stdout + done.stderr


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_each_alert_has_its_runbook_section():
    headings = {
        anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("### ")
    }
    for name, r in alerts().items():
        url = r["annotations"]["runbook_url"]
        assert url == f"{RUNBOOK_BASE}#{anchor(name)}", name
        assert anchor(name) in headings, f"docs/RUNBOOK.md has no section for {name}"
        assert r["labels"]["severity"] in ("info", "warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]


# PromQL words that are not series names.
KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "inf", "nan", "sum", "min", "max", "avg", "count", "group",
    "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
}  # fmt: skip


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana panel's) selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges, Grafana's $__rate_interval
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", expr)
    return {n for n in names if n not in KEYWORDS}


def test_series_names_finds_what_an_expression_selects():
    expr = (
        'histogram_quantile(0.95, sum by (le, route) (rate(ofa_a_bucket{route!~"/x|y"}'
        "[$__rate_interval]))) / on (route) group_left max(ofa_b) * 1e6 > bool ofa_c offset 5m"
    )
    assert series_names(expr) == {"ofa_a_bucket", "ofa_b", "ofa_c"}


SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported(text: str) -> set[str]:
    """The series names an exposition offers: its samples', and those its families'
    types promise (a labelled family with no child yet shows its TYPE line alone)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",))}
    return names


@pytest.fixture
def api(inproc_settings, clean_inproc) -> Iterator[TestClient]:
    with TestClient(create_app(inproc_settings), headers={"X-API-Key": API_KEY}) as client:
        yield client


def dashboard_exprs() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD.read_text())
    out = []
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def test_alerts_and_panels_name_only_exported_series(api):
    names = exported(api.get("/metrics").text)
    for name, r in alerts().items():
        missing = series_names(r["expr"]) - names
        assert not missing, f"alert {name} names {missing}, which /metrics does not export"
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    for title, expr in exprs:
        found = series_names(expr)
        assert found, (title, expr)
        assert not found - names, f"panel {title!r} names {found - names}, not exported"
    named = set().union(*(series_names(e) for _, e in exprs))
    for wanted in (
        "ofa_api_requests_total",  # request rate
        "ofa_api_request_seconds_bucket",  # latency
        "ofa_cache_lookups_total",  # hit ratio
        "ofa_jobs_pending",  # queue depth
        "ofa_oldest_pending_job_seconds",  # and age
        "ofa_batch_items_total",  # batch size
        "ofa_device_busy_seconds_total",
        "ofa_scans_unfinished",  # scans in progress
        "ofa_scan_rows_finished_total",  # and their rate
    ):
        assert wanted in named, wanted


def test_the_dashboard_is_a_grafana_dashboard():
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"
            assert {t["refId"] for t in panel["targets"]} == {
                chr(65 + i) for i in range(len(panel["targets"]))
            }


def value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


class Receiver(http.server.BaseHTTPRequestHandler):
    """A webhook receiver: /ok accepts, anything else answers 500."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(204 if self.path == "/ok" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_metrics_read_the_store(api, jobs, scans, inproc_settings, inproc_redis, receiver):
    """What /metrics reads from the durable store: workers alive for the model, the
    batches' items and busy time (as a worker's BatchTally writes them), webhook
    outcomes (as the coordinator's deliveries count them), unfinished, overdue and
    progressing scans, and the Redis servers' memory."""
    from worker.runtime import BatchTally
    from worker.scans.webhooks import Webhooks

    durable = inproc_redis.durable
    text = api.get("/metrics").text
    model = dict(zip(("model", "revision"), inproc_settings.model_tag, strict=True))
    assert value(text, "ofa_workers_alive", **model) == 0
    stores = wiring.stores(inproc_settings, sync=inproc_redis)
    stores.workers.beat("w1", 5)

    tally = BatchTally(jobs)
    tally.add(8, 0.25)
    tally.add(4, 0.5)
    tally.flush()

    settings = inproc_settings.model_copy(
        update={
            "webhook_secret": SecretStr("s" * 32),
            "url_allow_hosts": ["127.0.0.1"],
            "callback_max_retries": 2,
        }
    )
    slots = WebhookSlots(settings, jobs.keys, stores.clients, bound=4, hold_s=10)
    hooks = Webhooks(settings, stores.reads, scans, slots, stores.webhook_log)
    outcomes = []
    for path, retries in (("/ok", 0), ("/ok", 1), ("/down", 0), ("/down", 2)):
        scan_id = uuid.uuid4().hex
        scans.create(scan_id, 1, "m.jsonl", callback_url=receiver + path)
        outcomes.append(hooks.run(TASK_SCAN_WEBHOOK, [scan_id, "d"], {}, retries).kind)
    assert outcomes == ["delivered", "delivered", "retry", "failed"]

    running = uuid.uuid4().hex
    scans.create(running, 10, "m.jsonl", callback_url=None)
    durable.hset(scans.keys.scan(running), mapping={"done": 6, "failed": 1})
    durable.zadd(scans.keys.scan_deadlines(), {running: time.time() - 1})  # gone quiet

    text = api.get("/metrics").text
    assert value(text, "ofa_workers_alive", **model) == 1
    assert value(text, "ofa_batches_total") == 2
    assert value(text, "ofa_batch_items_total") == 12
    assert value(text, "ofa_device_busy_seconds_total") == pytest.approx(0.75)
    assert value(text, "ofa_webhook_deliveries_total", outcome="delivered") == 2
    assert value(text, "ofa_webhook_deliveries_total", outcome="retried") == 1
    assert value(text, "ofa_webhook_deliveries_total", outcome="failed") == 1
    assert value(text, "ofa_scans_unfinished") == 5  # the four callbacks' scans too
    assert value(text, "ofa_scans_overdue") == 1
    assert value(text, "ofa_scan_rows_finished_total", scan=running) == 7
    info = redis.Redis(connection_pool=durable.connection_pool).info("memory")
    used = value(text, "ofa_redis_memory_used_bytes", store="durable")
    assert used and abs(used - info["used_memory"]) < 0.2 * info["used_memory"]
    assert value(text, "ofa_redis_memory_max_bytes", store="durable") == info["maxmemory"]


def test_redis_memory_where_info_is_not_allowed(rdb, valkey):
    """The deployed service roles may not run INFO (a "dangerous" command): the bytes
    used come from MEMORY STATS, and the cap is unknown (no max series, no alert)."""
    import asyncio

    import redis.asyncio as aioredis

    from api.routes.health import redis_memory

    user = f"nodanger-{uuid.uuid4().hex[:8]}"
    rdb.acl_setuser(
        user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-@dangerous"]
    )

    async def read() -> tuple[tuple[int, int | None], tuple[int, int | None]]:
        limited = aioredis.Redis.from_url(valkey, username=user, password="pw")
        full = aioredis.Redis.from_url(valkey)
        try:
            return await redis_memory(limited), await redis_memory(full)
        finally:
            await limited.aclose()
            await full.aclose()

    try:
        (used, cap), (full_used, full_cap) = asyncio.run(read())
    finally:
        rdb.acl_deluser(user)
    assert cap is None and full_cap is not None
    assert used > 0 and abs(used - full_used) < 0.2 * full_used
