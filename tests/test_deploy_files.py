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

ROOT = Path(__file__).resolve().parents[1]


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
    assert re.search(r"\$\{OFA_API_KEYS:\?", raw) and re.search(r"\$\{OFA_FLOWER_PASSWORD:\?", raw)


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
    assert "pip install torch" not in api_docker and "COPY worker" not in api_docker
    assert "torch==" in (ROOT / "Dockerfile.worker").read_text()
