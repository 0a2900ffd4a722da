"""Registry rows -> the rows engine.report plots (variants plus, when they share one, the source)."""
from __future__ import annotations

import fnmatch
import json

from .registry import Registry


def report_rows(reg: Registry, patterns: tuple[str, ...] = ()) -> list[dict]:
    rows = []
    sources = set()
    source_row = None
    for row in reg.variants():
        if patterns and not any(fnmatch.fnmatchcase(row.name, p) for p in patterns):
            continue
        scores = reg.scores(row)
        rows.append({"name": row.name, "version": row.version, "runtime": row.runtime,
                     "weight_dtype": row.weight_dtype, "group_size": row.group_size,
                     "size_bytes": row.size_bytes, "scores": scores})
        sources.add(row.source_key)
        ratio, ppl = scores.get("size_ratio"), scores.get("source_perplexity")
        if ratio and ppl:
            weight_bytes = ratio["method"]["source_weight_bytes"]
            source_row = {"name": "source", "runtime": "pytorch fp32", "weight_dtype": "source",
                          "size_bytes": weight_bytes, "is_source": True,
                          "scores": {"perplexity": {k: ppl[k] for k in ("value", "unit", "method", "method_id")}}}
            for row_ in rows:
                row_["source_size_bytes"] = weight_bytes
    if source_row and len(sources) == 1:  # one source for all: draw it as the reference point
        rows.append(source_row)
    return [json.loads(json.dumps(r)) for r in rows]
