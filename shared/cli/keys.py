"""``ofa-entail keys create|list|revoke``: API key records in the durable store.

Talks to Redis directly (``OFA_REDIS_URL``, or the embedded server ``ofa-entail up``
started in this data directory), so it is run by an operator next to the service, not
through the API.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from shared.settings import Settings


def _store(settings: Settings) -> Any:
    from shared import wiring

    return wiring.stores(settings, sync=wiring.sync_redis(settings)).apikeys


def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    """Create a key and print it once."""
    from shared.store.apikeys import parse_scopes

    try:
        scopes = parse_scopes(args.scopes)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    per_minute = settings.rate_limit_per_min if args.rate is None else args.rate
    burst = settings.rate_limit_burst if args.burst is None else args.burst
    try:
        token = _store(settings).create(args.name, scopes, per_minute, burst, args.bucket)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"key": token, "id": token.split("_")[1], "name": args.name}))
    else:
        print(token)
        print(
            f"key {token.split('_')[1]} ({args.name}): scopes {','.join(sorted(scopes))}, "
            f"{per_minute:g}/min, burst {burst}"
            + (f", buckets {' '.join(args.bucket)}" if args.bucket else "")
            + ". Only its hash is stored: keep it now.",
            file=sys.stderr,
        )
    return 0


def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    """One line a key (never the secret)."""
    records = _store(settings).list()
    if args.json:
        print(json.dumps([r.__dict__ for r in records], indent=2))
        return 0
    print(f"{'id':<16}  {'name':<20}  {'scopes':<16}  {'per min':>8}  {'burst':>5}  state")
    for r in records:
        state = (
            "revoked " + time.strftime("%Y-%m-%d %H:%M", time.gmtime(r.revoked_at))
            if r.revoked_at
            else "active"
        )
        print(
            f"{r.key_id:<16}  {r.name[:20]:<20}  {','.join(r.scopes):<16}  "
            f"{r.per_minute:>8g}  {r.burst:>5}  {state}"
        )
    return 0


def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoke a key by id (the API refuses it within OFA_KEY_CACHE_S seconds)."""
    if not _store(settings).revoke(args.key_id):
        print(f"error: no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id} (refused within {settings.key_cache_s:g}s everywhere)")
    return 0


def add_commands(sub: Any) -> None:
    """Register ``keys`` and its sub-commands."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys (records in Redis)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key and print it (once)")
    create.add_argument("--name", required=True, help="who or what uses it")
    create.add_argument(
        "--scopes",
        default="jobs",
        help="comma-separated: jobs (submit, poll, cancel jobs), scans (run and read "
        "scans), read (poll and read only). Default: jobs",
    )
    create.add_argument("--rate", type=float, help="submissions per minute (0: unlimited)")
    create.add_argument("--burst", type=int, help="requests allowed at once")
    create.add_argument(
        "--bucket",
        action="append",
        metavar="URL",
        help="an object URL prefix the key may name (s3://bucket/, s3://bucket/prefix/, "
        "gs://..., az://...), within OFA_OBJECT_BUCKETS; repeat for more. Default: the "
        "global list alone",
    )
    create.add_argument("--json", action="store_true", help="print JSON")
    create.set_defaults(func=cmd_create)
    lst = ksub.add_parser("list", help="every key, active and revoked")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=cmd_list)
    revoke = ksub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_revoke)
