"""A scan's report: accuracy, confusion matrix, and precision/recall per label across
thresholds, over the rows whose manifest line carries a gold ``label``; and the same
drawn as a self-contained HTML page (inline SVG, no scripts, nothing fetched)."""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from typing import Any

from shared.models import CurvePoint, ScanReport, ScanSummary
from shared.scans.changes import KINDS as CHANGE_KINDS
from shared.scans.manifest import GOLD_LABELS

THRESHOLDS = tuple(round(i / 20, 2) for i in range(21))  # 0.00, 0.05, ..., 1.00


def build_report(scan_id: str, rows: Iterable[tuple[str, str]]) -> ScanReport:
    """From (gold label, verdict JSON) pairs."""
    labels = list(GOLD_LABELS)
    confusion = {g: dict.fromkeys(labels, 0) for g in labels}
    scored: list[tuple[str, dict[str, float]]] = []
    for gold, verdict_json in rows:
        verdict = json.loads(verdict_json)
        confusion[gold][verdict["label"]] += 1
        scored.append((gold, verdict["probabilities"]))
    n = len(scored)
    right = sum(confusion[label][label] for label in labels)
    curves: dict[str, list[CurvePoint]] = {}
    for label in labels:
        positives = sum(1 for gold, _ in scored if gold == label)
        points = []
        for t in THRESHOLDS:
            predicted = [gold for gold, probs in scored if probs[label] >= t]
            hits = sum(1 for gold in predicted if gold == label)
            points.append(
                CurvePoint(
                    threshold=t,
                    precision=hits / len(predicted) if predicted else None,
                    recall=hits / positives if positives else None,
                )
            )
        curves[label] = points
    return ScanReport(
        scan_id=scan_id,
        labelled=n,
        accuracy=right / n if n else None,
        labels=labels,
        confusion=confusion,
        curves=curves,
    )


COLOURS = {"entailment": "#1b7837", "contradiction": "#b2182b", "neutral": "#5e6b7a"}


def confusion_svg(report: ScanReport) -> str:
    """The confusion matrix as an SVG table, darker for more rows."""
    cell, pad = 84, 110
    labels = report.labels
    peak = max([1, *(v for row in report.confusion.values() for v in row.values())])
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{pad + cell * 3 + 10}" '
        f'height="{pad + cell * 3 + 10}" aria-label="Confusion matrix: gold labels in rows, '
        'predicted labels in columns">',
        f'<text x="{pad + cell * 1.5}" y="18" text-anchor="middle" font-size="13">predicted</text>',
    ]
    for j, label in enumerate(labels):
        x = pad + cell * j + cell / 2
        parts.append(
            f'<text x="{x}" y="{pad - 12}" text-anchor="middle" font-size="12">{label}</text>'
        )
    for i, gold in enumerate(labels):
        y = pad + cell * i
        parts.append(
            f'<text x="{pad - 8}" y="{y + cell / 2 + 4}" text-anchor="end" '
            f'font-size="12">{gold}</text>'
        )
        for j, predicted in enumerate(labels):
            n = report.confusion[gold][predicted]
            shade = 0.08 + 0.8 * n / peak
            fill = COLOURS[gold] if i == j else "#444"
            ink = "#fff" if shade > 0.5 else "#000"
            x = pad + cell * j
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell - 2}" height="{cell - 2}" fill="{fill}" '
                f'fill-opacity="{shade:.2f}">'
                f"<title>gold {gold}, predicted {predicted}: {n}</title></rect>"
                f'<text x="{x + cell / 2}" y="{y + cell / 2 + 5}" text-anchor="middle" '
                f'font-size="16" fill="{ink}">{n}</text>'
            )
    parts.append(
        f'<text x="14" y="{pad + cell * 1.5}" font-size="13" '
        f'transform="rotate(-90 14 {pad + cell * 1.5})" text-anchor="middle">gold</text></svg>'
    )
    return "".join(parts)


def curves_svg(report: ScanReport) -> str:
    """Precision (y) against recall (x) per label, one polyline each."""
    w, h, m = 360, 300, 40
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" width="{w}" height="{h}" '
        'aria-label="Precision-recall curves per label">',
        f'<rect x="{m}" y="10" width="{w - m - 10}" height="{h - m - 10}" '
        'fill="none" stroke="#999"/>',
        f'<text x="{(w + m) / 2}" y="{h - 8}" text-anchor="middle" font-size="12">recall</text>',
        f'<text x="12" y="{h / 2}" font-size="12" transform="rotate(-90 12 {h / 2})" '
        'text-anchor="middle">precision</text>',
    ]
    for k, label in enumerate(report.labels):
        points = [
            (p.recall, p.precision)
            for p in report.curves[label]
            if p.recall is not None and p.precision is not None
        ]
        coords = " ".join(
            f"{m + r * (w - m - 10):.1f},{10 + (1 - pr) * (h - m - 10):.1f}" for r, pr in points
        )
        if coords:
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{COLOURS[label]}" '
                f'stroke-width="2"><title>{label}</title></polyline>'
            )
        parts.append(
            f'<text x="{m + 8}" y="{28 + 16 * k}" font-size="12" fill="{COLOURS[label]}">'
            f"— {label}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


# The changes a report page lists (all of them: GET /v1/scans/{id}/changes).
REPORT_CHANGES = 200


def changes_html(summary: ScanSummary | None, changes: Iterable[dict[str, Any]]) -> str:
    """The "Changes since <baseline>" section of a catalogue scan (empty for others):
    the counts, then the first ``REPORT_CHANGES`` changes."""
    if summary is None or summary.catalogue is None:
        return ""
    name = html.escape(summary.catalogue)
    if summary.changes is None or summary.baseline_scan is None:
        return (
            f"<h2>Changes</h2><p>Catalogue <code>{name}</code>: no earlier succeeded scan to "
            "compare with (its first, or the last one has expired).</p>"
        )
    c = summary.changes
    counts = "".join(
        f"<tr><th scope='row'>{kind.replace('_', ' ')}</th><td>{getattr(c, kind)}</td></tr>"
        for kind in (*CHANGE_KINDS, "unmatched")
    )
    rows = []
    for i, doc in enumerate(changes):
        if i == REPORT_CHANGES:
            break
        rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(text)}</td>"
                for text in (
                    doc["kind"].replace("_", " "),
                    doc["id"],
                    _side(doc, "old"),
                    _side(doc, "new"),
                )
            )
            + "</tr>"
        )
    total = sum(getattr(c, kind) for kind in CHANGE_KINDS)
    more = f" (the first {REPORT_CHANGES} of {total})" if total > REPORT_CHANGES else ""
    listed = (
        "<table><thead><tr><th>change</th><th>id</th><th>before</th><th>now</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>Nothing changed.</p>"
    )
    baseline = html.escape(summary.baseline_scan)
    return f"""<h2>Changes since <code>{baseline}</code></h2>
<p>Catalogue <code>{name}</code>, compared by row id with its previous succeeded scan{more};
every change: <code>GET /v1/scans/{html.escape(summary.scan_id)}/changes</code>.</p>
<table class="changes"><tbody>{counts}</tbody></table>
{listed}
"""


def _side(doc: dict[str, Any], side: str) -> str:
    if doc[f"{side}_label"]:
        p = (doc[f"{side}_probabilities"] or {}).get(doc[f"{side}_label"])
        return f"{doc[f'{side}_label']} ({p:.0%})" if p is not None else doc[f"{side}_label"]
    return doc[f"{side}_error"] or "–"


def report_html(
    report: ScanReport, summary: ScanSummary | None = None, changes: Iterable[dict[str, Any]] = ()
) -> str:
    """A self-contained page: the figures, the matrix and the curves; for a catalogue
    scan (``summary``), its ``changes`` since the previous one."""
    accuracy = f"{report.accuracy:.1%}" if report.accuracy is not None else "–"
    rows = "".join(
        f"<tr><th scope='row'>{label}</th>"
        + "".join(
            f"<td>{p.threshold:.2f}: P {_pct(p.precision)} / R {_pct(p.recall)}</td>"
            for p in report.curves[label][::5]
        )
        + "</tr>"
        for label in report.labels
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Scan report {html.escape(report.scan_id)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:1.5rem;max-width:60rem}}
figure{{display:inline-block;margin:0 1.5rem 1rem 0;vertical-align:top}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.25rem .5rem}}</style>
</head><body>
<h1>Scan report</h1>
<p>Scan <code>{html.escape(report.scan_id)}</code>: {report.labelled} rows with a gold label,
accuracy <strong>{accuracy}</strong>. Rows without a gold label are not counted.</p>
<figure><figcaption>Confusion matrix</figcaption>{confusion_svg(report)}</figure>
<figure><figcaption>Precision and recall across thresholds</figcaption>{curves_svg(report)}</figure>
<h2>Precision (P) and recall (R) when a label is predicted at probability ≥ threshold</h2>
<table><tbody>{rows}</tbody></table>
{changes_html(summary, changes)}</body></html>
"""


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"
