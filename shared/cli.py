"""``ofa-entail``: the project's command line.

Each sub-command imports only what it needs, so the API-side commands work on a
machine without torch and the model commands without a web stack.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("ofa_entail")


def _print_verdict(verdict: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(json.dumps(verdict, indent=2))
        return
    probs = verdict["probabilities"]
    assert isinstance(probs, dict)
    print(f"{verdict['label']}  (answer: {verdict['answer']})")
    for label in ("entailment", "contradiction", "neutral"):
        print(f"  {label:<13} {probs[label]:.4f}")


def cmd_predict(args: argparse.Namespace) -> int:
    """Score one image and sentence locally, no service involved."""
    from shared.settings import get_settings
    from worker.ofa.entail import Entailer

    settings = get_settings()
    model = args.model or settings.model_ref
    entailer = Entailer.load(
        model,
        revision=None if args.model else settings.model_revision,
        cache_dir=str(settings.model_cache_dir) if settings.model_cache_dir else None,
        device=args.device or settings.device,
        dtype=settings.dtype,
        max_pixels=settings.max_pixels,
    )
    if entailer.ckpt.warning:
        print(f"warning: {entailer.ckpt.warning}", file=sys.stderr)
    data = Path(args.image).read_bytes()
    verdict = entailer.predict(data, args.text, args.premise).to_dict()
    _print_verdict(verdict, args.json)
    return 0


def cmd_model_tiny(args: argparse.Namespace) -> int:
    """Write a small random checkpoint in the ModelScope layout."""
    from worker.ofa.tiny import WARNING, write_tiny_checkpoint

    out = write_tiny_checkpoint(
        args.dir, seed=args.seed, patch_image_size=args.image_size, prompt_type=args.prompt_type
    )
    print(f"wrote {out}")
    print(WARNING, file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="ofa-entail",
        description="Visual entailment with OFA: does the image support the text?",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="score one image and sentence locally")
    p.add_argument("image", help="image file")
    p.add_argument("text", help="the hypothesis: does the image support it?")
    p.add_argument("--premise", help="optional premise text")
    p.add_argument("--model", help="checkpoint directory or ModelScope id (default: settings)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: settings)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)

    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_command", required=True)
    t = msub.add_parser("tiny", help="write a small RANDOM checkpoint (tests, offline demos)")
    t.add_argument("dir", help="output directory")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--image-size", type=int, default=128, help="patch_image_size (default 128)")
    t.add_argument("--prompt-type", choices=["prev_output", "none"], default="prev_output")
    t.set_defaults(func=cmd_model_tiny)

    from shared import cli_service

    cli_service.add_commands(sub)
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

    try:
        return int(args.func(args))
    except OfaEntailError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
