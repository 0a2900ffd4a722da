"""Compare two registered variants: recipe fields, files (same bytes or not), and scores."""
from __future__ import annotations

import json
from typing import Any

from .comparability import comparable, present
from .records import VariantRecord


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(inner, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix: value}


def diff_variants(a: VariantRecord, b: VariantRecord, files_a: list[dict], files_b: list[dict],
                  scores_a: dict, scores_b: dict, weights_a: dict | None = None, weights_b: dict | None = None) -> dict:
    """A JSON-able comparison; a delta only for scores `engine.comparability` calls comparable.
    `weights_*`: each artifact's precision summary (engine.precision), compared per module kind."""
    ra, rb = _flatten(a.recipe), _flatten(b.recipe)
    recipe = [{"field": k, "a": ra.get(k), "b": rb.get(k)} for k in sorted(set(ra) | set(rb)) if ra.get(k) != rb.get(k)]
    fa, fb = {f["path"]: f for f in files_a}, {f["path"]: f for f in files_b}
    files = {
        "same": sorted(p for p in fa.keys() & fb.keys() if fa[p]["sha256"] == fb[p]["sha256"]),
        "changed": sorted(p for p in fa.keys() & fb.keys() if fa[p]["sha256"] != fb[p]["sha256"]),
        "only_a": sorted(fa.keys() - fb.keys()),
        "only_b": sorted(fb.keys() - fa.keys()),
    }
    scores = []
    for metric in [m for m in scores_a] + [m for m in scores_b if m not in scores_a]:
        sa, sb = scores_a.get(metric), scores_b.get(metric)
        same = comparable(sa, sb)
        scores.append({"metric": metric, "unit": (sa or sb)["unit"], "a": sa and sa["value"], "b": sb and sb["value"],
                       "delta": (sb["value"] - sa["value"]) if same else None, "comparable": same})
    weights = []
    if weights_a or weights_b:
        from .precision import KINDS, describe

        weights = [{"kind": k, "a": describe(weights_a or {}, k), "b": describe(weights_b or {}, k),
                    "same": (weights_a or {}).get(k) == (weights_b or {}).get(k)}
                   for k in KINDS if k in (weights_a or {}) or k in (weights_b or {})]
    return {"a": a.ref, "b": b.ref,
            "same_artifact": a.artifact_key == b.artifact_key, "recipe": recipe, "files": files,
            "weights": weights, "scores": scores}


def diff_text(doc: dict) -> list:
    from rich.table import Table

    parts: list = [f"{doc['a']} vs {doc['b']}" + ("  (the same artifact)" if doc["same_artifact"] else "")]
    recipe = Table(title="recipe", box=None, header_style="bold", title_justify="left")
    for col in ("field", doc["a"], doc["b"]):
        recipe.add_column(col)
    for row in doc["recipe"]:
        recipe.add_row(row["field"], json.dumps(row["a"]), json.dumps(row["b"]))
    parts.append(recipe if doc["recipe"] else "recipe: identical")
    f = doc["files"]
    parts.append(f"files: {len(f['same'])} identical, {len(f['changed'])} differ"
                 + "".join(f"\n  differ: {p}" for p in f["changed"])
                 + "".join(f"\n  only in {doc['a']}: {p}" for p in f["only_a"])
                 + "".join(f"\n  only in {doc['b']}: {p}" for p in f["only_b"]))
    if doc.get("weights"):
        weights = Table(title="weights as built", box=None, header_style="bold", title_justify="left")
        for col in ("module kind", doc["a"], doc["b"], ""):
            weights.add_column(col)
        for row in doc["weights"]:
            weights.add_row(row["kind"], row["a"], row["b"], "" if row["same"] else "differs")
        parts.append(weights)
    if doc["scores"]:
        scores = Table(title="scores", box=None, header_style="bold", title_justify="left")
        for col in ("metric", doc["a"], doc["b"], "b - a"):
            scores.add_column(col, justify="left" if col == "metric" else "right")
        for s in doc["scores"]:
            fmt = lambda v: "-" if v is None else f"{v:.6g}"  # noqa: E731
            measured = present({"value": s["a"]}) and present({"value": s["b"]})  # else a gap, not a mismatch
            delta = (fmt(s["delta"]) if s["comparable"] else "not comparable (different method)" if measured
                     else "-")
            scores.add_row(f"{s['metric']} ({s['unit']})", fmt(s["a"]), fmt(s["b"]), delta)
        parts.append(scores)
    return parts
