"""`ofa-entail up` then `ofa-entail check`, as the README runs them; Flower lists the worker."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shared.cli.secrets import read_env_file
from tests.helpers import free_port, photo


@pytest.mark.slow
def test_up_check_flower_and_clean_shutdown(tiny_dir: Path, tmp_path: Path):
    api_port, flower_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFA_")}
    env.update(
        OFA_MODEL_DIR=str(tiny_dir),
        OFA_MODEL="tiny-random",
        OFA_MODEL_REVISION="up-test",
        OFA_API_PORT=str(api_port),
        OFA_FLOWER_PORT=str(flower_port),
        OFA_DEVICE="cpu",
        PYTHONUNBUFFERED="1",
    )
    cli = [sys.executable, "-m", "shared.cli"]
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([*cli, "up"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            assert up.poll() is None, (tmp_path / "up.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{api_port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "up.log").read_text()
            time.sleep(0.3)
        image = tmp_path / "coffee.jpg"
        photo("coffee").save(image)
        check = subprocess.run(
            [*cli, "check", str(image), "There is a cup of coffee."],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        first = check.stdout.splitlines()[0]
        assert first.split()[0] in ("entailment", "contradiction", "neutral")
        assert "entailment" in check.stdout and "neutral" in check.stdout

        secrets_file = tmp_path / ".data" / "secrets.env"
        assert secrets_file.stat().st_mode & 0o777 == 0o600
        password = read_env_file(secrets_file)["OFA_FLOWER_PASSWORD"]
        flower = f"http://127.0.0.1:{flower_port}"
        assert httpx.get(f"{flower}/workers", timeout=5).status_code == 401
        deadline = time.monotonic() + 30
        while True:
            page = httpx.get(f"{flower}/workers", auth=("admin", password), timeout=5)
            if page.status_code == 200 and "ofa@" in page.text:
                break
            assert time.monotonic() < deadline, page.text[:2000]
            time.sleep(0.5)
        # Flower shows each job's verdict (the task's result, from its events).
        deadline = time.monotonic() + 30
        while True:
            tasks = httpx.get(f"{flower}/api/tasks", auth=("admin", password), timeout=5)
            results = [t.get("result") or "" for t in tasks.json().values()]
            if any("entailment=" in r and "neutral=" in r for r in results):
                break
            assert time.monotonic() < deadline, tasks.text[:2000]
            time.sleep(0.5)
        # No secret on any command line (`ps` shows them to every local user).
        cmdlines = []
        for proc_file in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):  # a process may end while we look
                cmdlines.append(proc_file.read_bytes())
        assert any(b"flower" in c for c in cmdlines)
        assert not [c for c in cmdlines if password.encode() in c]
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert code == 0, (tmp_path / "up.log").read_text()
    text = (tmp_path / "up.log").read_text()
    assert f"API:    http://127.0.0.1:{api_port}" in text and "stopped" in text
