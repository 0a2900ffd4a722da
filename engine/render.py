"""Turn registry rows into tables for people and stable JSON for scripts."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # engine.runtime is not needed to list variants
    from .runtime import Section

from .comparability import method_letters
from .records import ListedVariant, StepRecord, VariantRecord

#: keys of `engine ls --json` rows, in order; adding keys is fine, renaming is a breaking change
LS_KEYS = ("name", "version", "runtime", "device", "weight_dtype", "group_size", "scheme",
           "algorithm", "size_bytes", "created", "description", "source_kind", "artifact_key")


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


#: (metric, column title, format) shown by `engine ls`
HEADLINE = (("perplexity", "ppl", "{:.2f}"), ("kl_divergence", "KL", "{:.2e}"),
            ("top1_agreement", "top1", "{:.1%}"), ("size_ratio", "size×", "{:.2f}"),
            ("decode_tokens_per_s", "tok/s", "{:.0f}"),
            # feature-extraction and text2text-generation variants (engine/task_eval.py); their
            # methods name their task, so no value is ever read against another task's
            ("cosine_mean", "cos", "{:.4f}"), ("retrieval_top10_agreement", "top10", "{:.1%}"),
            ("sentences_per_s", "sent/s", "{:.0f}"), ("target_perplexity", "tgt ppl", "{:.3g}"))


def ls_row(row: Any, scores: dict | None = None) -> dict:
    """One `engine ls --json` row from a ListedVariant (its own scores) or a VariantRecord + scores."""
    if scores is None and isinstance(row, ListedVariant):
        return json.loads(_ls_json_line(row, {}))
    out = {key: getattr(row, key) for key in LS_KEYS}
    source = getattr(row, "source", None)
    out["source"] = source.get("identity") if isinstance(source, dict) and "identity" in source else source
    scores = getattr(row, "scores", None) if scores is None else scores
    out["scores"] = {m: {"value": s["value"], "unit": s["unit"], "method_id": s["method_id"]}
                     for m, s in (scores or {}).items()}
    return out


def ls_json(rows: list[ListedVariant]) -> str:
    """`engine ls --json`: one row per line (json's C encoder; indent= would use the slow Python one)."""
    sources: dict[int, str] = {}  # variants of one source share its (decoded) identity object
    lines = [_ls_json_line(row, sources) for row in rows]
    return "[\n" + ",\n".join(lines) + ("\n]" if lines else "]")


def _ls_json_line(row: ListedVariant, sources: dict[int, str]) -> str:
    """One row's JSON, spliced from the encoded columns and the evaluation's prepared scores fragment
    (nothing decoded); `sources` keeps each shared source identity encoded once."""
    source = row.source
    if id(source) not in sources:
        shown = source.get("identity") if isinstance(source, dict) and "identity" in source else source
        sources[id(source)] = json.dumps(shown)
    return f'{json.dumps(dict(zip(LS_KEYS, row)))[:-1]}, "source": {sources[id(source)]}, "scores": {row.scores_json}}}'


def show_doc(row: VariantRecord, files: list[dict], steps: list[StepRecord], scores: dict | None = None,
             build_meta: dict | None = None, sections: list[Section] = (),
             hidden_meta: tuple[str, ...] = ()) -> dict[str, Any]:
    """Everything recorded about one variant, as one JSON document.

    `sections` are the runtime's own tables, `hidden_meta` the build facts it keeps out of the summary.
    """
    doc = {key: getattr(row, key) for key in LS_KEYS}
    doc.update(
        engine_version=row.engine_version,
        recipe_path=row.recipe_path,
        recipe_sha256=row.recipe_sha256,
        recipe=row.recipe,
        recipe_text=row.recipe_text,
        source=row.source,
        steps=[{
            "kind": s.kind, "key": s.key, "cached": s.cached, "duration_s": s.duration_s,
            "params": s.params, "versions": s.versions, "finished": s.finished,
        } for s in steps],
        files=files,
        scores=scores or {},
        build_meta=build_meta or {},
        sections=[{"title": x.title, "columns": list(x.columns), "rows": x.rows} for x in sections],
        hidden_meta=list(hidden_meta),
    )
    return doc


LS_COLUMNS = ("name", "ver", "runtime", "device", "dtype", "group", "scheme", "algo", "size")
_RIGHT = {"ver", "group", "size"}


def ls_cells(rows: list[Any], scored: list[dict] | None = None, methods: dict[str, dict] | None = None
             ) -> tuple[list[str], list[tuple[str, ...]], list[str]]:
    """(headers, cells, footnotes) of `engine ls`: the variants with their headline scores.

    Without `scored` the rows are ListedVariants and their prepared cells are used (engine/
    score_summary.py), unless a metric's values come from different methods: those are tagged from
    the decoded scores. `methods` maps method_id -> method for the footnotes, where the scores do not
    carry theirs. Built a column at a time (comprehensions, then one zip).
    """
    prepared = _prepared_columns(rows) if scored is None else None
    if prepared is not None:
        shown, values, tags = prepared
    else:
        scored = [r.scores for r in rows] if scored is None else scored
        shown, values, tags = _scored_columns(scored)
    headers = [*LS_COLUMNS, *(title for _, title, _ in shown), "created"]
    low = {"fp16", "bf16", "fp32"}
    cells = list(zip(
        [r.name for r in rows], [str(r.version) for r in rows], [r.runtime for r in rows], [r.device for r in rows],
        [r.weight_dtype or "-" for r in rows],
        ["-" if r.weight_dtype in low or r.group_size is None else str(r.group_size) for r in rows],
        [r.scheme or "-" for r in rows], [r.algorithm or "-" for r in rows], [human_size(r.size_bytes) for r in rows],
        *values, [r.created[:16].replace("T", " ") if r.created else "" for r in rows]))
    notes = []
    for metric, letters in tags.items():
        found = {s[metric]["method_id"]: s[metric].get("method") for s in scored if metric in s}
        described = "; ".join(f"({letter}) {_method_text(found.get(mid) or (methods or {}).get(mid) or {})}"
                              for mid, letter in letters.items())
        notes.append(f"{metric}: not comparable across methods {described}")
    return headers, cells, notes


def _prepared_columns(rows: list[ListedVariant]) -> tuple[list, list[list[str]], dict] | None:
    """(shown HEADLINE entries, their columns, no tags) from the prepared cells; None when a metric
    was measured by more than one method (then the scores themselves decide the tags)."""
    ids_per_slot = [set(ids) for ids in zip(*(m.split("\t") for m in {r.methods for r in rows} - {None}))]
    if not ids_per_slot:  # nothing evaluated
        return [], [], {}
    slots = [i for i, ids in enumerate(ids_per_slot) if ids - {""}]
    if any(len(ids_per_slot[i] - {""}) > 1 for i in slots):
        return None
    unscored = [""] * len(HEADLINE)
    split = [r.cells.split("\t") if r.cells is not None else unscored for r in rows]
    return [HEADLINE[i] for i in slots], [[s[i] or "-" for s in split] for i in slots], {}


def _scored_columns(scored: list[dict]) -> tuple[list, list[list[str]], dict]:
    """(shown HEADLINE entries, their columns, {metric: {method_id: letter}}) from {metric: score} dicts."""
    present = set().union(*scored)  # the metrics any row has (one C-level pass over the dicts' keys)
    by_metric = {metric: [s.get(metric) for s in scored] for metric, _, _ in HEADLINE if metric in present}
    shown = [(m, title, fmt) for m, title, fmt in HEADLINE if m in by_metric]
    mixed = [m for m, _, _ in shown if len({x["method_id"] for x in by_metric[m] if x is not None}) > 1]
    tags = method_letters(scored, mixed) if mixed else {}  # values of different methods: (a), (b)
    values = []
    for metric, _, fmt in shown:
        fmt, tagged = fmt.format, tags.get(metric)
        if tagged:
            values.append(["-" if x is None else f"{fmt(x['value'])} ({tag})" if (tag := tagged.get(x["method_id"]))
                           else fmt(x["value"]) for x in by_metric[metric]])
        else:
            values.append(["-" if x is None else fmt(x["value"]) for x in by_metric[metric]])
    return shown, values, tags


def ls_text(headers: list[str], cells: list[list[str]]) -> str:
    """Plain aligned columns (pipes, long listings): one string, no terminal library involved."""
    widths = [max(len(h), max(map(len, column), default=0)) for h, column in zip(headers, zip(*cells))] \
        if cells else [len(h) for h in headers]
    right = [h in _RIGHT or h in {t for _, t, _ in HEADLINE} for h in headers]
    row_format = "  ".join(f"{{:{'>' if r else '<'}{w}}}" for w, r in zip(widths, right))
    return "\n".join(row_format.format(*row).rstrip() for row in [headers, *cells])


def ls_table(rows: list[Any], scored: list[dict] | None = None, methods: dict[str, dict] | None = None):
    """The variants as a rich table (for a terminal); returns (table, footnotes)."""
    from rich.table import Table

    headers, cells, notes = ls_cells(rows, scored, methods)
    table = Table(box=None, header_style="bold")
    for col in headers:
        table.add_column(col, justify="right" if col in _RIGHT or col not in LS_COLUMNS + ("created",) else "left")
    for row in cells:
        table.add_row(*row)
    return table, notes


#: build facts `engine show` leaves out of its summary (everything is in --json); a runtime hides more
#: through Runtime.hidden_meta
_HIDDEN_META = {"runtime", "recipe", "builder_args", "implementation", "api", "implementation_version", "weights"}


def _build_rows(meta: dict, hidden: set[str]) -> list[tuple[str, str]]:
    rows = []
    if "implementation" in meta:
        rows.append(("implementation", f"{meta['implementation']} {meta.get('implementation_version', '')} "
                                       f"({meta.get('api', '')})"))
    for key, value in meta.items():
        if key not in _HIDDEN_META | hidden:
            rows.append((f"build: {key}", value if isinstance(value, str) else json.dumps(value, sort_keys=True)))
    return rows


def _method_text(method: dict) -> str:
    parts = []
    for key, value in sorted(method.items()):
        if key == "dataset_sha256":
            value = str(value)[:12] + "…"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def show_text(doc: dict) -> list:
    """Renderables for `engine show`."""
    from rich.table import Table

    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    source = doc["source"]
    for key, value in (
        ("variant", f"{doc['name']}@{doc['version']}"),
        ("description", doc["description"] or "-"),
        ("created", doc["created"]),
        ("runtime", f"{doc['runtime']} on {doc['device']}"),
        ("quantization", json.dumps(doc["recipe"].get("quantization", {}), sort_keys=True)),
        ("target options", json.dumps(doc["recipe"]["target"].get("options", {}), sort_keys=True)),
        ("defaults", ", ".join(f"{k.split('.', 1)[1]}={json.dumps(v)}" for k, v in doc.get("defaults", {}).items()
                               if k != "target.options") + "  (not written in the recipe: the runtime's or schema's)"
         if doc.get("defaults") else "-"),
        ("source", f"{source['kind']}: " + json.dumps(source["identity"], sort_keys=True)),
        *([("lineage", " <- ".join(doc["lineage"]))] if doc.get("lineage") else []),
        ("recipe", f"{doc['recipe_path'] or '-'} (sha256 {doc['recipe_sha256'][:16]}…)"),
        ("artifact", f"{doc['artifact_key']}  {human_size(doc['size_bytes'])} in {len(doc['files'])} files"),
        ("engine", doc["engine_version"]),
        *_build_rows(doc.get("build_meta", {}), set(doc.get("hidden_meta", ()))),
    ):
        head.add_row(key, str(value))
    steps = Table(title="steps", box=None, header_style="bold", title_justify="left")
    for col in ("step", "cached", "seconds", "key", "versions"):
        steps.add_column(col)
    for s in doc["steps"]:
        versions = ", ".join(f"{k} {v}" for k, v in sorted(s["versions"].items())) or "-"
        steps.add_row(s["kind"], "yes" if s["cached"] else "no", f"{s['duration_s']:.2f}", s["key"][:16] + "…", versions)
    files = Table(title="files", box=None, header_style="bold", title_justify="left")
    for col in ("path", "size", "sha256"):
        files.add_column(col, justify="right" if col == "size" else "left")
    for f in doc["files"]:
        files.add_row(f["path"], human_size(f["size"]), f["sha256"])
    parts = [head, steps, files]
    weights = doc.get("build_meta", {}).get("weights")
    if weights:  # read from the artifact at build time: what each kind of weight really became
        from .precision import KINDS, describe

        table = Table(title="weights as built (read from the artifact)", min_width=60, box=None, header_style="bold",
                      title_justify="left")
        table.add_column("module kind")
        table.add_column("precision x tensors")
        for kind in KINDS:
            if kind in weights:
                table.add_row(kind, describe(weights, kind))
        parts.insert(1, table)
    for section in reversed(doc.get("sections", [])):  # the runtime's own tables, after the summary
        table = Table(title=section["title"], box=None, header_style="bold", title_justify="left")
        for col in section["columns"]:
            table.add_column(col)
        for row in section["rows"]:
            table.add_row(*(json.dumps(c) if not isinstance(c, str) else c for c in row))
        parts.insert(1, table)
    if doc["scores"]:
        scores = Table(title="scores", box=None, header_style="bold", title_justify="left")
        for col in ("metric", "value", "unit", "method", "measured"):
            scores.add_column(col, justify="right" if col == "value" else "left")
        for metric, s in doc["scores"].items():
            value = f"{s['value']:.6g}"
            scores.add_row(metric, value, s["unit"], _method_text(s["method"]), s["created"])
        parts.insert(1, scores)
    return parts
