"""How the command line prints a verdict (``shared/cli/output.py``)."""

from __future__ import annotations

import json

from shared.cli.output import print_verdict
from tests.helpers import VERDICT


def test_a_verdict_for_a_person(capsys):
    print_verdict(VERDICT.model_dump(), as_json=False)
    assert capsys.readouterr().out.splitlines() == [
        "neutral  (answer: maybe)",
        "  entailment    0.2000",
        "  contradiction 0.3000",
        "  neutral       0.5000",
    ]


def test_a_verdict_as_json(capsys):
    doc = VERDICT.model_dump(mode="json")
    print_verdict(doc, as_json=True)
    assert json.loads(capsys.readouterr().out) == doc
