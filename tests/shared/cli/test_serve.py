"""`ofa-entail flower` as an operator runs it: never without its password."""

from __future__ import annotations

import os
import subprocess
import sys

CLI = [sys.executable, "-m", "shared.cli"]


def test_flower_refuses_to_start_without_its_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFA_")}
    env.update(OFA_ENVIRONMENT="production", OFA_REDIS_URL="redis://127.0.0.1:1/0")
    done = subprocess.run(
        [*CLI, "flower"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path
    )
    assert done.returncode == 2
    assert "set OFA_FLOWER_PASSWORD" in done.stderr
