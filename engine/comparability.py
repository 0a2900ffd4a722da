"""When two scores may be read side by side: the one rule behind `engine ls`, `diff` and `report`.

A score is a dict {"value", "unit", "method", "method_id", ...}. A perplexity measured over another
window or dataset is a different number, so two scores are comparable only when both are real
measurements and share a `method_id`. Pure and standard-library only, so every caller stays cheap.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["comparable", "majority_method", "measured_by", "method_letters", "present"]


def present(score: Any) -> bool:
    """A score with a finite numeric value; NaN, inf or no value is no measurement to compare."""
    if type(score) is not dict and not isinstance(score, Mapping):  # dict first: ls asks 50,000 times
        return False
    value = score.get("value")
    if type(value) is float:
        return math.isfinite(value)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def measured_by(score: Any, method_id: str | None) -> bool:
    """`score` is present and was measured by `method_id` (the group it is compared within)."""
    return present(score) and score.get("method_id") == method_id


def comparable(a: Any, b: Any) -> bool:
    """Both scores present and measured the same way: only then is `b - a` meaningful."""
    return present(a) and measured_by(b, a.get("method_id"))


def method_letters(scores_list: Iterable[Mapping[str, Any]],
                   metrics: Iterable[str]) -> dict[str, dict[str | None, str]]:
    """metric -> {method_id: letter} for the metrics measured by more than one method.

    `scores_list` holds one {metric: score} per row; values tagged with different letters must not
    be read side by side. Letters follow the sorted method_ids, so they do not depend on row order.
    """
    rows = list(scores_list)
    out: dict[str, dict[str | None, str]] = {}
    for metric in metrics:  # one cheap pass per metric first: `engine ls` calls this on 10,000 rows
        if len({score.get("method_id") for s in rows if (score := s.get(metric)) is not None}) < 2:
            continue  # one method at most: nothing to tell apart
        scores = [score for s in rows if (score := s.get(metric)) is not None]
        ids = sorted({score.get("method_id") for score in scores if present(score)}, key=str)
        if len(ids) > 1:
            out[metric] = {mid: chr(ord("a") + i) for i, mid in enumerate(ids)}
    return out


def majority_method(rows: Iterable[Mapping[str, Any]], metric: str) -> str | None:
    """The method_id most rows measured `metric` with (ties: first seen): the group compared.

    Rows are {"scores": {metric: score}, "is_source": bool, ...}. Variants outvote the source row,
    so one odd source score cannot push every variant out of the comparison; the source decides
    only when it is the sole row with the metric.
    """
    counts: Counter[str | None] = Counter()
    for row in rows:
        score = (row.get("scores") or {}).get(metric)
        if present(score):
            counts[score.get("method_id")] += 0 if row.get("is_source") else 1
    return max(counts, key=counts.__getitem__) if counts else None  # max keeps the first on ties
