"""``pip install ./clients/python`` into an empty virtual environment: the client and
what it needs (httpx, pydantic), none of the service's own dependencies."""

from __future__ import annotations

import json
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"
SERVICE_ONLY = ("celery", "fastapi", "redis", "kombu", "torch", "starlette", "uvicorn")


@pytest.mark.slow
def test_the_client_installs_alone(tmp_path):
    # A copy, so that the build's egg-info and build/ folders stay out of the checkout.
    source = tmp_path / "src"
    shutil.copytree(
        CLIENT,
        source,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "tests"),
    )
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False, clear=True).create(env_dir)
    python = str(env_dir / "bin" / "python")
    # Whatever index pip is configured with here (PyPI, or the machine's local one); an
    # unreachable one fails within minutes, with pip's own words below.
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "--timeout", "30", "--retries", "2", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, (
        "pip could not install the client; can it reach an index? "
        "(`pip config list`, /etc/pip.conf)\n" + install.stdout[-3000:] + install.stderr[-3000:]
    )
    listed = subprocess.run(
        [*pip, "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {canonicalize_name(p["name"]) for p in json.loads(listed.stdout)}
    assert {"ofa-entail-client", "httpx", "pydantic"} <= installed, installed
    unwanted = {n for n in installed if n in SERVICE_ONLY or n.startswith("valkey")}
    assert not unwanted and "ofa-entail" not in installed, installed
    imported = subprocess.run(
        [
            python,
            "-c",
            "import sys; from importlib.metadata import version; "
            "import ofa_entail_client as o; from ofa_entail_client import AsyncClient, Client; "
            "assert o.__version__ == version('ofa-entail-client'), o.__version__; "
            "assert not {'celery', 'fastapi', 'redis', 'torch', 'shared'} & set(sys.modules)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert imported.returncode == 0, imported.stderr
