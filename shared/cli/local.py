"""The commands that run the model in this process: ``predict`` and ``model tiny``.

The one module of ``shared`` that imports ``worker`` (the model runtime): it is
imported only when one of its commands runs, so the rest of the CLI works on a
machine without torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.cli.output import print_verdict
from shared.settings import Settings


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    """Score one image and sentence locally, no service involved."""
    from worker.runtime import load_entailer

    entailer = load_entailer(settings, model=args.model, device=args.device)
    if entailer.ckpt.warning:
        print(f"warning: {entailer.ckpt.warning}", file=sys.stderr)
    data = Path(args.image).read_bytes()
    prediction = entailer.predict(data, args.text, args.premise).to_dict()
    print_verdict(prediction, args.json)
    return 0


def cmd_model_tiny(args: argparse.Namespace, settings: Settings) -> int:
    """Write a small random checkpoint in the ModelScope layout."""
    from worker.ofa.tiny import WARNING, write_tiny_checkpoint

    out = write_tiny_checkpoint(
        args.dir, seed=args.seed, patch_image_size=args.image_size, prompt_type=args.prompt_type
    )
    print(f"wrote {out}")
    print(WARNING, file=sys.stderr)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``predict`` and ``model tiny``."""
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
