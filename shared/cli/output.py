"""How the command line prints things."""

from __future__ import annotations

import json
from typing import Any


def print_verdict(verdict: dict[str, Any], as_json: bool) -> None:
    """A verdict (or the model's bare prediction) for a person, or as JSON."""
    if as_json:
        print(json.dumps(verdict, indent=2))
        return
    probs = verdict["probabilities"]
    print(f"{verdict['label']}  (answer: {verdict['answer']})")
    for label in ("entailment", "contradiction", "neutral"):
        print(f"  {label:<13} {probs[label]:.4f}")
