"""Dockerfiles and the compose file, checked the ways that work without a Docker engine:
schema validation, hadolint, and the properties the deployment relies on."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

from tests.sizes import docker_bytes, redis_bytes

ROOT = Path(__file__).resolve().parents[1]
ROLES = ("api", "worker", "coordinator", "flower")
PAYLOAD_ROLES = ("api", "worker", "coordinator")  # who writes, reads or sweeps payloads


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_specification():
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())


def test_compose_roles_and_secrets():
    doc = compose()
    services = doc["services"]
    assert {
        "redis-durable",
        "redis-cache",
        "redis-payload",
        "api",
        "worker",
        "coordinator",
        "flower",
    } <= set(services)
    assert "deploy" not in services["coordinator"]  # no GPU for the coordinator
    assert "scans-data:/data/scans" in services["api"]["volumes"]
    durable = services["redis-durable"]["command"]
    # always, not everysec: production waits for WAITAOF on every submission.
    assert "--appendonly yes" in durable and "--appendfsync always" in durable
    assert "noeviction" in durable
    cache = services["redis-cache"]["command"]
    assert "allkeys-lru" in cache and "--maxmemory" in cache
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
    assert all(
        "healthcheck" in services[s]
        for s in ("redis-durable", "redis-cache", "redis-payload", "api", "flower")
    )
    assert "model-cache:/models" in services["worker"]["volumes"]
    raw = (ROOT / "docker-compose.yml").read_text()
    # Secrets have no defaults: compose fails fast when they are missing.
    redis_passwords = [f"OFA_REDIS_PASSWORD_{role.upper()}" for role in ROLES]
    for name in ["OFA_API_KEYS", "OFA_FLOWER_PASSWORD", "OFA_WEBHOOK_SECRET", *redis_passwords]:
        assert re.search(r"\$\{" + name + r":\?", raw), name
        assert not re.search(r"\$\{" + name + r":?-", raw), name  # no default anywhere
    # Each service gets only the secrets it uses.
    secrets_of = {
        "api": {"OFA_API_KEYS", "OFA_WEBHOOK_SECRET", "OFA_REDIS_PASSWORD_API"},
        "worker": {"OFA_REDIS_PASSWORD_WORKER"},
        "coordinator": {"OFA_WEBHOOK_SECRET", "OFA_REDIS_PASSWORD_COORDINATOR"},
        "flower": {"OFA_FLOWER_PASSWORD", "OFA_REDIS_PASSWORD_FLOWER"},
        "redis-durable": {f"OFA_REDIS_PASSWORD_{role.upper()}" for role in ROLES},
        "redis-cache": {f"OFA_REDIS_PASSWORD_{r.upper()}" for r in ROLES if r != "flower"},
        "redis-payload": {f"OFA_REDIS_PASSWORD_{r.upper()}" for r in PAYLOAD_ROLES},
    }
    secret_names = set().union(*secrets_of.values())
    for name, wanted in secrets_of.items():
        used = re.findall(r"\$\{(OFA_[A-Z_]+):\?", json.dumps(services[name].get("environment")))
        assert set(used) & secret_names == wanted, name


def test_compose_redis_needs_passwords_and_caps_its_memory():
    """Both Redis servers start through the ACL script (the default user off); every
    component's Redis URL names its role's user and password; the durable Redis keeps
    noeviction under a maxmemory a fifth or more below its memory limit."""
    services = compose()["services"]
    for name in ("redis-durable", "redis-cache", "redis-payload"):
        redis = services[name]
        # The durable one through redis-ha.sh, which hands over to redis-start.sh.
        script = "redis-ha.sh" if name == "redis-durable" else "redis-start.sh"
        assert redis["entrypoint"][:2] == ["sh", f"/etc/redis-start/{script}"], name
        assert (
            "./deploy/k8s/base/redis-start.sh:/etc/redis-start/redis-start.sh:ro"
            in (redis["volumes"])
        )
        assert redis["read_only"] is True and redis["cap_drop"] == ["ALL"], name
        assert "probe" in redis["healthcheck"]["test"], name
    for role in ROLES:
        env = services[role]["environment"]
        secret = f"${{OFA_REDIS_PASSWORD_{role.upper()}:?"
        for key in ("OFA_REDIS_URL", "OFA_CACHE_REDIS_URL", "OFA_PAYLOAD_REDIS_URLS"):
            if key in env:
                assert env[key].startswith(f"redis://{role}:{secret}"), (role, key)
        assert "OFA_REDIS_URL" in env, role

    def default(value: str) -> str:
        return re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", value)

    for name, headroom in (("redis-durable", 0.2), ("redis-cache", 0.1), ("redis-payload", 0.2)):
        command = default(services[name]["command"]).split()
        cap = redis_bytes(command[command.index("--maxmemory") + 1])
        limit = docker_bytes(default(services[name]["mem_limit"]))
        assert 0 < cap <= limit * (1 - headroom), (name, cap, limit)
    assert "--maxmemory-policy noeviction" in services["redis-durable"]["command"]
    # Flower (it can shut workers down) is published on the host's loopback only.
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])


def test_compose_shares_one_payload_store():
    """The API, the workers and the coordinator keep images of unfinished jobs in the
    one payload Redis (the same server for all, each as its own role's user), which
    starts after nothing and before them; it persists nothing, never evicts, and lets
    its users reach payload keys only (under the service's key prefix); Flower has no
    payload settings and no user there."""
    from shared.settings import Settings

    services = compose()["services"]
    payload = services["redis-payload"]
    command = payload["command"]
    assert "--maxmemory-policy noeviction" in command and "--appendonly no" in command
    assert '--save ""' in command
    assert "/data" in payload["tmpfs"] and not any(":/data" in v for v in payload["volumes"])
    prefix = Settings.model_fields["key_prefix"].default
    assert payload["environment"]["REDIS_KEYS"] == f"{prefix}payload:*"
    assert "REDIS_PASSWORD_FLOWER" not in payload["environment"]
    hosts = set()
    for role in ROLES:
        service = services[role]
        env = service["environment"]
        if role not in PAYLOAD_ROLES:
            assert not {k for k in env if "PAYLOAD" in k}, role
            continue
        assert env["OFA_PAYLOAD_STORE"] == "redis", role
        urls = env["OFA_PAYLOAD_REDIS_URLS"].split(",")
        hosts |= {u.rpartition("@")[2] for u in urls}
        assert service["depends_on"]["redis-payload"] == {"condition": "service_healthy"}
    assert hosts == {"redis-payload:6379/0"}


def test_dockerfiles_pass_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "Dockerfile.api", "Dockerfile.worker"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_api_image_needs_no_torch():
    """What Dockerfile.api installs (no worker extra) is enough for the API and Flower."""
    code = (
        "import sys, api.app, shared.cli, shared.celery_app\n"
        "api.app.create_app\n"
        "assert 'torch' not in sys.modules, 'the API imported torch'\n"
        "assert 'worker.ofa.model' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    api_docker = (ROOT / "Dockerfile.api").read_text()
    assert "requirements/api.txt" in api_docker and "COPY worker" not in api_docker
    assert "torch.txt" not in api_docker and "pip install torch" not in api_docker
    assert "pip install -r requirements/torch.txt" in (ROOT / "Dockerfile.worker").read_text()


SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
OVERRIDE = ROOT / "deploy/compose/sentinel.yml"


def merged(base: dict, override: dict) -> dict:
    """``override`` merged into ``base`` as ``docker compose -f base -f override``
    merges mappings (the only kind the override holds)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            out[key] = merged(base[key], value)
        else:
            out[key] = value
    return out


def test_compose_sentinel_profile():
    """The `sentinel` profile: a replica of the durable Redis (same command: AOF with
    appendfsync always, noeviction, capped) and three Sentinels (quorum 2, each
    announcing its own service name, all naming the same three), started only with the
    profile, hardened as the other Redis servers, the replication and Sentinel
    passwords only where they are used; the override file (schema-valid once merged)
    points every component's durable URL at the three Sentinels with its own role's
    user and password and acknowledges on a replica's disk; the cache stays single."""
    doc = compose()
    services = doc["services"]
    profiled = {name for name, s in services.items() if s.get("profiles")}
    assert profiled == {"redis-durable-replica", *SENTINELS}
    assert all(services[n]["profiles"] == ["sentinel"] for n in profiled)
    durable, replica = services["redis-durable"], services["redis-durable-replica"]
    assert (
        replica["command"] == durable["command"] and replica["entrypoint"] == durable["entrypoint"]
    )
    assert replica["mem_limit"] == durable["mem_limit"]
    assert "durable-replica-data:/data" in replica["volumes"]
    assert durable["environment"]["REDIS_ANNOUNCE"] == "redis-durable:6379"
    assert replica["environment"]["REDIS_ANNOUNCE"] == "redis-durable-replica:6379"
    addresses = {f"{name}:26379" for name in SENTINELS}
    for name in SENTINELS:
        sentinel = services[name]
        assert sentinel["entrypoint"] == ["sh", "/etc/redis-start/redis-ha.sh", "sentinel"]
        env = sentinel["environment"]
        assert env["SENTINEL_ANNOUNCE"] == f"{name}:26379"
        assert env["SENTINEL_QUORUM"] == "2" and int(env["SENTINEL_DOWN_AFTER_MS"]) <= 5000
        assert set(env["REDIS_SENTINELS"].split()) == addresses
        assert env["REDIS_INITIAL_PRIMARY"] == "redis-durable:6379"
        assert env["REDIS_MASTER_NAME"] == "ofa-durable"
        assert sentinel["read_only"] is True and sentinel["cap_drop"] == ["ALL"]
        assert "/run/redis" in sentinel["tmpfs"]  # its configuration, rewritten as it learns
        assert (
            "./deploy/k8s/base/redis-ha.sh:/etc/redis-start/redis-ha.sh:ro" in (sentinel["volumes"])
        )
    ha = ("REDIS_SENTINELS", "REDIS_MASTER_NAME", "REDIS_INITIAL_PRIMARY")
    for name in ("redis-durable", "redis-durable-replica"):
        env = services[name]["environment"]
        sentinel_env = services["sentinel-1"]["environment"]
        assert all(env[k] == sentinel_env[k] for k in ha), name
    # The replication password: the durable servers only; the Sentinels': them and
    # the Sentinels. (Empty without the profile: no such users, and redis-ha.sh refuses
    # to start a replica or a Sentinel without them.)
    for name, service in services.items():
        env = json.dumps(service.get("environment", {}))
        replication = "OFA_REDIS_PASSWORD_REPLICATION" in env
        sentinel = "OFA_REDIS_PASSWORD_SENTINEL" in env
        durable_server = name in ("redis-durable", "redis-durable-replica")
        assert replication == durable_server, name
        assert sentinel == (durable_server or name in SENTINELS), name

    override = yaml.safe_load(OVERRIDE.read_text())
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    whole = merged(doc, override)
    jsonschema.Draft201909Validator(schema).validate(whole)
    assert set(override["services"]) == set(ROLES)
    for role in ROLES:
        env = whole["services"][role]["environment"]
        url = env["OFA_REDIS_URL"]
        secret = f"${{OFA_REDIS_PASSWORD_{role.upper()}:?"
        match = re.fullmatch(r"sentinel://(\w+):(\$\{[^}]+\})@([^/]+)/ofa-durable/0", url)
        assert match, (role, url)
        assert match[1] == role and match[2].startswith(secret), (role, url)
        assert set(match[3].split(",")) == addresses, (role, url)
        assert env.get("OFA_DURABLE_ACK") == ("replica" if role != "flower" else None), role
        assert env.get("OFA_CACHE_REDIS_URL", "@redis-cache:").count("@redis-cache:") == 1
        assert set(whole["services"][role]["depends_on"]) >= set(SENTINELS), role
