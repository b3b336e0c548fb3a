"""``ofa-entail``: the project's command line.

One module per kind of command: ``serve`` runs the service's processes, ``client``
talks to a running service over HTTP, ``local`` runs the model in this process (the
only one that imports the model runtime, and only when its commands run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from shared.cli import client, keys, local, serve

logger = logging.getLogger("ofa_entail")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="ofa-entail",
        description="Visual entailment with OFA: does the image support the text?",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    local.add_commands(sub)
    serve.add_commands(sub)
    client.add_commands(sub)
    keys.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ofa-entail`` script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from shared.errors import OfaEntailError
    from shared.settings import get_settings

    try:
        return int(args.func(args, get_settings()))
    except OfaEntailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
