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


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_matches_the_compose_specification():
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    jsonschema.Draft201909Validator(schema).validate(compose())


def test_compose_roles_and_secrets():
    doc = compose()
    services = doc["services"]
    assert {"redis-durable", "redis-cache", "api", "worker", "coordinator", "flower"} <= set(
        services
    )
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
        "healthcheck" in services[s] for s in ("redis-durable", "redis-cache", "api", "flower")
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
    for name in ("redis-durable", "redis-cache"):
        redis = services[name]
        assert redis["entrypoint"] == ["sh", "/etc/redis-start/redis-start.sh"], name
        assert (
            "./deploy/k8s/base/redis-start.sh:/etc/redis-start/redis-start.sh:ro"
            in (redis["volumes"])
        )
        assert redis["read_only"] is True and redis["cap_drop"] == ["ALL"], name
        assert "probe" in redis["healthcheck"]["test"], name
    for role in ROLES:
        env = services[role]["environment"]
        secret = f"${{OFA_REDIS_PASSWORD_{role.upper()}:?"
        for key in ("OFA_REDIS_URL", "OFA_CACHE_REDIS_URL"):
            if key in env:
                assert env[key].startswith(f"redis://{role}:{secret}"), (role, key)
        assert "OFA_REDIS_URL" in env, role

    def default(value: str) -> str:
        return re.sub(r"\$\{\w+:-([^}]+)\}", r"\1", value)

    for name, headroom in (("redis-durable", 0.2), ("redis-cache", 0.1)):
        command = default(services[name]["command"]).split()
        cap = redis_bytes(command[command.index("--maxmemory") + 1])
        limit = docker_bytes(default(services[name]["mem_limit"]))
        assert 0 < cap <= limit * (1 - headroom), (name, cap, limit)
    assert "--maxmemory-policy noeviction" in services["redis-durable"]["command"]
    # Flower (it can shut workers down) is published on the host's loopback only.
    assert all(p.startswith("127.0.0.1:") for p in services["flower"]["ports"])


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
