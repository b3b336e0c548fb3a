"""``ofa-entail keys create|list|revoke`` (``shared/cli/keys.py``) against the test
Valkey, under a key prefix of its own: what it prints, what it stores, its refusals."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from shared.cli import build_parser
from tests.helpers import key_store


@pytest.fixture
def settings(inproc_settings, rdb: redis.Redis) -> Iterator:
    prefix = f"ofa:clikeys:{uuid.uuid4().hex[:8]}:"
    yield inproc_settings.model_copy(
        update={"key_prefix": prefix, "rate_limit_per_min": 60, "rate_limit_burst": 5}
    )
    for key in rdb.scan_iter(prefix + "*"):
        rdb.delete(key)


def run(settings, *argv: str) -> int:
    args = build_parser().parse_args(["keys", *argv])
    return int(args.func(args, settings))


def test_create_prints_the_key_once_and_stores_only_its_hash(settings, rdb, capsys):
    assert run(settings, "create", "--name", "team-a", "--scopes", "jobs,scans") == 0
    out, err = capsys.readouterr()
    token = out.strip()
    key_id = token.split("_")[1]
    assert f"key {key_id} (team-a): scopes jobs,scans, 60/min, burst 5." in err
    assert "Only its hash is stored" in err
    stored = b"".join(
        b"".join(rdb.hgetall(k).values())
        for k in rdb.scan_iter(settings.key_prefix + "*")
        if rdb.type(k) == b"hash"
    )
    assert token.encode() not in stored
    [record] = key_store(settings.key_prefix, rdb).list()
    assert (record.key_id, record.name) == (key_id, "team-a")


def test_create_as_json_with_its_own_limits(settings, capsys):
    assert run(settings, "create", "--name", "batch", "--rate", "0", "--burst", "2", "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "batch" and doc["id"] == doc["key"].split("_")[1]


def test_unknown_scopes_are_refused(settings, capsys):
    assert run(settings, "create", "--name", "x", "--scopes", "everything") == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_list_then_revoke(settings, capsys):
    run(settings, "create", "--name", "ops-dashboard", "--scopes", "read", "--json")
    key_id = json.loads(capsys.readouterr().out)["id"]
    assert run(settings, "list") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "scopes", "per", "min", "burst", "state"]
    [row] = [line for line in lines[1:] if line.startswith(key_id)]
    assert row.split()[1:] == ["ops-dashboard", "read", "60", "5", "active"]

    assert run(settings, "revoke", key_id) == 0
    assert capsys.readouterr().out.strip() == f"revoked {key_id} (refused within 0s everywhere)"
    assert run(settings, "list") == 0
    [row] = [line for line in capsys.readouterr().out.splitlines() if line.startswith(key_id)]
    assert row.split()[-3] == "revoked"
    assert run(settings, "list", "--json") == 0
    [record] = [r for r in json.loads(capsys.readouterr().out) if r["key_id"] == key_id]
    assert record["revoked_at"] > 0 and record["name"] == "ops-dashboard"


def test_revoking_an_unknown_key_is_an_error(settings, capsys):
    assert run(settings, "revoke", "nosuchkey") == 1
    assert capsys.readouterr().err.strip() == "error: no key nosuchkey"
