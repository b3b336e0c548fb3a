"""The Kubernetes manifests: every overlay rendered by kustomize (``kubectl kustomize``),
each object validated against the Kubernetes schemas (``kubernetes-validate``, strict)
and the ScaledObject against KEDA's (vendored), then the invariants the deployment
relies on checked on what would be applied."""

from __future__ import annotations

import copy
import json
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from shared.cli import build_parser
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("production", "cpu-trial")
K8S_VERSION = "1.32.0"
OUR = ("api", "worker", "coordinator", "flower")


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render the overlays"
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container(objs: list[dict], kind: str, name: str) -> dict:
    return one(objs, kind, name)["spec"]["template"]["spec"]["containers"][0]


def strict(schema: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever properties are listed."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


KEDA_SCHEMA = strict(
    json.loads((K8S / "schemas" / "keda.sh_v1alpha1_scaledobject.json").read_text())
)


def config(objs: list[dict]) -> dict[str, str]:
    return one(objs, "ConfigMap", "ofa-entail-config")["data"]


def test_every_object_is_valid(objects):
    _, objs = objects
    assert len(objs) >= 20
    for obj in objs:
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, KEDA_SCHEMA)
        else:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_the_validators_catch_mistakes():
    objs = render("production")
    deployment = copy.deepcopy(one(objs, "Deployment", "ofa-worker"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriod"] = 120  # misspelt
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    scaled = copy.deepcopy(one(objs, "ScaledObject", "ofa-worker"))
    scaled["spec"]["cooldownPeriods"] = 300  # misspelt
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMA)
    scaled = copy.deepcopy(one(objs, "ScaledObject", "ofa-worker"))
    del scaled["spec"]["triggers"][0]["type"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, KEDA_SCHEMA)


def test_config_is_what_the_service_reads(objects):
    """Every OFA_ name in the config map is a setting, and the settings (with the
    secrets the operator adds) pass the service's own production checks."""
    _, objs = objects
    data = config(objs)
    fields = {f"OFA_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    secrets = {"api_keys": "k" * 32, "flower_password": "p" * 16}
    values = {k.removeprefix("OFA_").lower(): v for k, v in data.items()}
    settings = Settings(_env_file=None, **values, **secrets)  # type: ignore[arg-type, call-arg]
    assert settings.environment == "production" and settings.durable_ack_on


def test_commands_are_real_commands(objects):
    _, objs = objects
    parser = build_parser()
    for obj in find(objs, "Deployment"):
        spec = obj["spec"]["template"]["spec"]["containers"][0]
        if spec["command"][0] == "ofa-entail":
            parser.parse_args(spec["command"][1:])  # SystemExit if not
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            command = spec.get(probe, {}).get("exec", {}).get("command", [])
            if command[:1] == ["ofa-entail"]:
                parser.parse_args(command[1:])


def test_workers_drain_and_are_probed(objects):
    overlay, objs = objects
    worker = one(objs, "Deployment", "ofa-worker")["spec"]["template"]["spec"]
    hard_limit = int(
        config(objs).get(
            "OFA_TASK_TIME_LIMIT_S", Settings.model_fields["task_time_limit_s"].default
        )
    )
    assert worker["terminationGracePeriodSeconds"] > hard_limit
    c = worker["containers"][0]
    assert c["readinessProbe"]["exec"]["command"][-1] == "ready"
    assert c["startupProbe"]["exec"]["command"][-1] == "ready"
    assert "alive" in c["livenessProbe"]["exec"]["command"]
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert config(objs)["OFA_HEALTH_DIR"] in mounts  # the probe files' directory
    gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
    if overlay == "production":
        assert gpus == "1" and c["resources"]["requests"]["nvidia.com/gpu"] == "1"
    else:
        assert gpus is None
    api = container(objs, "Deployment", "ofa-api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for name in ("ofa-api", "ofa-worker", "ofa-coordinator", "ofa-flower"):
        assert "livenessProbe" in container(objs, "Deployment", name), name


def test_redis_roles_and_nothing_exposed(objects):
    _, objs = objects
    durable = " ".join(container(objs, "StatefulSet", "redis-durable")["args"])
    assert "--appendonly yes" in durable and "--appendfsync always" in durable
    assert "--maxmemory-policy noeviction" in durable
    assert one(objs, "StatefulSet", "redis-durable")["spec"]["volumeClaimTemplates"]
    cache = " ".join(container(objs, "StatefulSet", "redis-cache")["args"])
    assert "--maxmemory-policy allkeys-lru" in cache and "--maxmemory 2gb" in cache
    # Only ClusterIP services; nothing but the API and Flower accepts outside traffic.
    for svc in find(objs, "Service"):
        assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", svc["metadata"]["name"]
    policies = find(objs, "NetworkPolicy")
    deny = one(objs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert (
        deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    )
    open_to_all = set()
    for pol in policies:
        for rule in pol["spec"].get("ingress", []):
            selector = pol["spec"]["podSelector"]
            if "from" not in rule:
                open_to_all.add(selector["matchLabels"]["app.kubernetes.io/component"])
            else:
                peers = rule["from"]
                # Redis accepts only the service's own pods, by label, in its namespace.
                assert all(set(p) == {"podSelector"} for p in peers), pol["metadata"]["name"]
                allowed = peers[0]["podSelector"]["matchExpressions"][0]["values"]
                assert set(allowed) == set(OUR)
    assert open_to_all == {"api", "flower"}
    redis_policy = one(objs, "NetworkPolicy", "allow-redis-from-service")["spec"]
    guarded = redis_policy["podSelector"]["matchExpressions"][0]["values"]
    assert set(guarded) == {"redis-durable", "redis-cache"}


def test_secrets_are_referenced_not_shipped(objects):
    _, objs = objects
    assert not find(objs, "Secret")
    for name in ("ofa-api", "ofa-worker", "ofa-coordinator", "ofa-flower"):
        refs = container(objs, "Deployment", name)["envFrom"]
        assert {"secretRef": {"name": "ofa-entail-secrets"}} in refs


def test_scans_share_one_volume(objects):
    overlay, objs = objects
    pvc = one(objs, "PersistentVolumeClaim", "ofa-scans")
    modes = pvc["spec"]["accessModes"]
    assert modes == (["ReadWriteMany"] if overlay == "production" else ["ReadWriteOnce"])
    scan_dir = config(objs)["OFA_SCAN_DIR"]
    for name in ("ofa-api", "ofa-coordinator"):
        spec = one(objs, "Deployment", name)["spec"]["template"]["spec"]
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in spec["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
        assert claims[mounts[scan_dir]] == "ofa-scans", name


def test_autoscaling(objects):
    overlay, objs = objects
    hpa = one(objs, "HorizontalPodAutoscaler", "ofa-api")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "ofa-api"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    budgets = {
        p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for p in find(objs, "PodDisruptionBudget")
    }
    assert {"api", "worker", "coordinator", "redis-durable"} <= budgets
    scaled = find(objs, "ScaledObject")
    if overlay != "production":
        assert not scaled  # the trial runs without KEDA
        return
    spec = scaled[0]["spec"]
    assert spec["scaleTargetRef"]["name"] == "ofa-worker"
    assert spec["minReplicaCount"] >= 1  # scale-to-zero off
    hard_limit = int(config(objs)["OFA_TASK_TIME_LIMIT_S"])
    assert spec["cooldownPeriod"] > hard_limit
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert behavior["stabilizationWindowSeconds"] > hard_limit
    trigger = spec["triggers"][0]
    assert trigger["type"] == "prometheus"
    data = config(objs)
    labels = f'model="{data["OFA_MODEL"]}",revision="{data["OFA_MODEL_REVISION"]}"'
    assert trigger["metadata"]["query"] == f"max(ofa_model_work{{{labels}}})"
    assert float(trigger["metadata"]["threshold"]) > 0


def test_api_pods_are_scraped_where_the_gauge_lives(objects):
    _, objs = objects
    meta = one(objs, "Deployment", "ofa-api")["spec"]["template"]["metadata"]
    assert meta["annotations"]["prometheus.io/path"] == "/metrics"
    command = container(objs, "Deployment", "ofa-api")["command"]
    assert meta["annotations"]["prometheus.io/port"] == command[command.index("--port") + 1]
    assert shlex.join(command).startswith("ofa-entail api")
