"""Secrets for a laptop set-up: from the environment, else generated once into
``data_dir/secrets.env`` (mode 600) and reused on later runs."""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from shared.settings import Settings

logger = logging.getLogger("ofa_entail")

SECRETS_FILE = "secrets.env"
GENERATED = ("OFA_API_KEYS", "OFA_FLOWER_PASSWORD", "OFA_WEBHOOK_SECRET")


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (comments and blanks skipped)."""
    out: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, _, v = line.partition("=")
                out[k.strip()] = v.strip()
    return out


def ensure_secrets(settings: Settings) -> dict[str, str]:
    """API key, Flower password and webhook secret for ``ofa-entail up``."""
    path = settings.data_dir / SECRETS_FILE
    stored = read_env_file(path)
    values = {name: os.environ.get(name) or stored.get(name) or "" for name in GENERATED}
    missing = [name for name, value in values.items() if not value]
    for name in missing:
        values[name] = secrets.token_urlsafe(32)
    if missing:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        path.chmod(0o600)
        logger.info("generated %s into %s", ", ".join(missing), path)
    return values


def stored_api_key(settings: Settings) -> str | None:
    """The first API key ``ofa-entail up`` generated in ``data_dir``, if any."""
    stored = read_env_file(settings.data_dir / SECRETS_FILE).get("OFA_API_KEYS", "")
    return stored.split(",")[0] if stored else None
