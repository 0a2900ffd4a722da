"""What `engine ls` reads of an evaluation: its scores summarised once, when they are recorded.

Listing 10,000 variants must not turn 50,000 score rows into Python objects. So each evaluation
gets one row in `score_summaries` (migration m004), written in the transaction that records its
scores: the `engine ls --json` fragment of its scores, the table's headline cells already
formatted, and the method id behind each cell (to tell when values are not comparable). The cells
carry a tag of the format they were made with (a digest of render.HEADLINE); the listing remakes,
in memory, any summary that is missing or of another format, so a changed format or a registry
written by an older engine never shows stale text.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from .render import HEADLINE

#: the tag of the cells' format: changes by itself when a headline column or its format does
CELLS_FORMAT = hashlib.sha256(repr(HEADLINE).encode()).hexdigest()[:12]


def summarize(rows: Iterable[tuple[str, float, str, str]]) -> tuple[str, str, str, str]:
    """(scores_json, cells, methods, format) of one evaluation from its (metric, value, unit, method_id)
    rows in metric order: the JSON object `engine ls --json` prints, and tab-separated HEADLINE cells
    and method ids ('' where the metric was not measured, '-' for a score without one)."""
    scores = {metric: {"value": value, "unit": unit, "method_id": method_id}
              for metric, value, unit, method_id in rows}
    return summarize_scores(scores)


def summarize_scores(scores: dict[str, dict]) -> tuple[str, str, str, str]:
    """summarize() of {metric: {value, unit, method_id}} (in metric order)."""
    cells = "\t".join(fmt.format(scores[m]["value"]) if m in scores else "" for m, _, fmt in HEADLINE)
    methods = "\t".join((scores[m]["method_id"] or "-") if m in scores else "" for m, _, _ in HEADLINE)
    return json.dumps(scores), cells, methods, CELLS_FORMAT


def write_summary(conn, eval_key: str) -> None:
    """(Re)write one evaluation's summary from the scores the registry holds for it."""
    rows = conn.execute("select metric, value, unit, method_id from scores where eval_key = ? order by metric",
                        [eval_key]).fetchall()
    conn.execute("insert or replace into score_summaries (eval_key, scores_json, cells, methods, cells_format)"
                 " values (?, ?, ?, ?, ?)", [eval_key, *summarize(rows)])
