"""The variant report: a self-contained HTML page and a PNG Pareto plot of size vs quality.

A pure library (no registry access): the CLI gathers one row per variant and calls `write_report`.
Which scores are compared is decided by `engine.comparability` (the rule `engine ls` and `engine
diff` use too). The page is the Jinja template templates/report.html.j2; jinja2 and matplotlib are
imported only when a report is written, so `import engine.report` stays cheap for the CLI.
"""
from __future__ import annotations

import base64
import functools
import io
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from .comparability import majority_method, measured_by, present

__all__ = ["Y_METRICS", "pareto_front", "write_report"]

#: metrics the plot can use as y; both are "lower is better", which the frontier assumes
Y_METRICS = ("perplexity", "kl_divergence")

#: table columns after size: (metric, header, format)
_COLUMNS = (
    ("perplexity", "perplexity", "{:.2f}"),
    ("kl_divergence", "KL (nats)", "{:.4g}"),
    ("top1_agreement", "top-1 agree", "{:.1%}"),
    ("decode_tokens_per_s", "decode tok/s", "{:.1f}"),
    ("prefill_tokens_per_s", "prefill tok/s", "{:.1f}"),
    ("load_seconds", "load s", "{:.2f}"),
)
#: columns of the other tasks (engine/task_eval.py), shown only when a row has the score; their
#: methods name their task, so the majority rule never compares them across tasks
_TASK_COLUMNS = (
    ("cosine_mean", "cosine mean", "{:.4f}"),
    ("retrieval_top10_agreement", "top-10 agree", "{:.1%}"),
    ("sentences_per_s", "sentences/s", "{:.0f}"),
    ("target_perplexity", "target ppl", "{:.3g}"),
)
_MISSING = "\u2013"  # en dash
_MB = 1e6

_TEMPLATES = Path(__file__).parent / "templates"


def _num(v: Any) -> float | None:
    """A finite float, or None for missing, NaN, inf and non-numbers (bools included)."""
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated when minimising both coordinates, sorted by x.

    Equal points are all kept (neither dominates the other); a point with a None/NaN/inf
    coordinate is never on the front, since it cannot be compared.
    """
    valid = [(x, y, i) for i, (x0, y0) in enumerate(points)
             if (x := _num(x0)) is not None and (y := _num(y0)) is not None]
    valid.sort()
    front: list[int] = []
    best: tuple[float, float] | None = None  # the last kept point: lowest y seen so far
    for x, y, i in valid:
        if best is None or y < best[1] or (x, y) == best:
            front.append(i)
            best = (x, y)
    return front


def _ref(row: dict) -> str:
    """'name@version' (what `engine show` accepts), or the bare name when there is no version."""
    v = row.get("version")
    return f"{row['name']}@{v}" if v is not None else str(row["name"])


def _score(row: dict, metric: str) -> dict | None:
    """The row's score for `metric` when it is a measurement (see comparability.present)."""
    s = (row.get("scores") or {}).get(metric)
    return s if present(s) else None


def _source_size(rows: list[dict]) -> int | None:
    for r in rows:
        if _num(r.get("source_size_bytes")) is not None:
            return int(r["source_size_bytes"])
    for r in rows:
        if r.get("is_source") and _num(r.get("size_bytes")) is not None:
            return int(r["size_bytes"])
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    """Write next to the target then os.replace, so a reader never sees half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a report is for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _mpl_text(s: str) -> str:
    """Escape '$' so user strings are never parsed as mathtext (which can raise)."""
    return s.replace("$", r"\$")


def _plot(points: list[dict], front: list[int], source_size: int | None, y_metric: str,
          y_unit: str, title: str) -> bytes:
    """Render the Pareto plot to PNG bytes: Agg canvas, no pyplot state, no timestamp."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(_mpl_text(title))
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel(_mpl_text(f"{y_metric} ({y_unit})" if y_unit else y_metric))
    ax.grid(True, alpha=0.3)

    xs = [p["x"] for p in points] + ([source_size / _MB] if source_size else [])
    if xs and min(xs) > 0 and max(xs) / min(xs) > 10:
        ax.set_xscale("log")
    ys = [p["y"] for p in points]
    if y_metric == "kl_divergence" and ys and min(ys) > 0:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", useOffset=False, style="plain")

    runtimes = sorted({str(p["runtime"]) for p in points if not p["source"]})
    colours = [f"C{i % 10}" for i in range(len(runtimes))]
    markers = "osD^vP<>Xh"
    handles, labels = [], []
    for k, rt in enumerate(runtimes):
        sel = [p for p in points if not p["source"] and str(p["runtime"]) == rt]
        h = ax.scatter([p["x"] for p in sel], [p["y"] for p in sel], c=colours[k],
                       marker=markers[k % len(markers)], s=40, zorder=3)
        handles.append(h)
        labels.append(_mpl_text(rt))
    for p in points:
        if p["source"]:
            h = ax.scatter([p["x"]], [p["y"]], marker="*", s=220, c="gold", edgecolors="k", zorder=4)
            ax.axhline(p["y"], color="gray", ls=":", lw=1)
            handles.append(h)
            labels.append("source")
    if front:
        fp = [points[i] for i in front]
        (h,) = ax.plot([p["x"] for p in fp], [p["y"] for p in fp], "-", color="crimson", lw=1.5, zorder=2)
        ax.scatter([p["x"] for p in fp], [p["y"] for p in fp], s=160, facecolors="none",
                   edgecolors="crimson", linewidths=1.5, zorder=4)
        handles.append(h)
        labels.append("Pareto frontier")
    if source_size:
        h = ax.axvline(source_size / _MB, color="gray", ls="--", lw=1)
        handles.append(h)
        labels.append("source size")
    for p in points:
        ax.annotate(_mpl_text(p["label"]), (p["x"], p["y"]), xytext=(5, 4),
                    textcoords="offset points", fontsize=7)
    if not points:
        ax.text(0.5, 0.5, _mpl_text(f"no comparable {y_metric} scores"), ha="center",
                va="center", transform=ax.transAxes)
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _cell(row: dict, metric: str, fmt: str, majority: str | None) -> dict:
    """One score cell; a score measured by a minority method is flagged (†) rather than compared."""
    s = _score(row, metric)
    if s is None:
        return {"text": _MISSING, "nc": False}
    return {"text": fmt.format(float(s["value"])), "nc": not measured_by(s, majority),
            "method_id": str(s.get("method_id"))}


def _fmt_method(method: Any) -> str:
    if isinstance(method, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(method.items(), key=lambda kv: str(kv[0])))
    return str(method)


def _split(rows: list[dict], y_metric: str, majority: str | None) -> tuple[list[dict], list[str], list[dict]]:
    """(points to plot, skipped refs, not comparable): only the majority method's scores share a plot."""
    points: list[dict] = []
    skipped: list[str] = []
    not_comparable: list[dict] = []
    for r in rows:
        s, size = _score(r, y_metric), _num(r.get("size_bytes"))
        if s is None or size is None:
            skipped.append(_ref(r))
        elif not measured_by(s, majority):
            not_comparable.append({"name": _ref(r), "method_id": s.get("method_id"), "method": s.get("method")})
        else:
            points.append({"label": _ref(r), "x": size / _MB, "y": float(s["value"]), "runtime": r.get("runtime"),
                           "source": bool(r.get("is_source")), "unit": s.get("unit"), "method": s.get("method")})
    return points, skipped, not_comparable


def _front(points: list[dict]) -> list[int]:
    """Indices into `points` of the Pareto front; the source star is a reference, never on it."""
    candidates = [i for i, p in enumerate(points) if not p["source"]]
    return [candidates[j] for j in pareto_front([(points[i]["x"], points[i]["y"]) for i in candidates])]


def _columns(rows: list[dict]) -> tuple:
    """The score columns: the causal LM ones always, another task's when some row has its score."""
    return _COLUMNS + tuple(c for c in _TASK_COLUMNS if any(c[0] in (r.get("scores") or {}) for r in rows))


def _table_rows(rows: list[dict], on_front: set[str], source_size: int | None) -> list[dict]:
    """The table, smallest first, as display strings: the template only lays them out."""
    columns = _columns(rows)
    majorities = {m: majority_method(rows, m) for m, _, _ in columns}

    def order(r: dict) -> tuple:
        size = _num(r.get("size_bytes"))
        return (size is None, size or 0.0, str(r.get("name")), str(r.get("version")))

    out = []
    for r in sorted(rows, key=order):
        ref, size, src = _ref(r), _num(r.get("size_bytes")), bool(r.get("is_source"))
        front = ref in on_front and not src
        out.append({"cls": "front" if front else "source" if src else "", "front": front, "source": src,
                    "ref": ref, "runtime": str(r.get("runtime") or _MISSING),
                    "dtype": str(r.get("weight_dtype") or _MISSING),
                    "group": _MISSING if r.get("group_size") is None else str(r["group_size"]),
                    "size": _MISSING if size is None else f"{size / _MB:.2f}",
                    "ratio": f"{size / source_size:.3f}" if size is not None and source_size else _MISSING,
                    "scores": [_cell(r, m, fmt, majorities[m]) for m, _, fmt in columns]})
    return out


@functools.lru_cache(maxsize=1)
def _template() -> Any:
    """The page template, read from the package folder (so it works from an installed wheel too)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(_TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    return env.get_template("report.html.j2")


def write_report(rows: list[dict], html_path: Path, png_path: Path | None = None, *,
                 y_metric: str = "perplexity", title: str = "engine report",
                 generated: str | None = None) -> dict:
    """Write the HTML report (inline CSS, plot as a base64 PNG, no URLs or scripts) and the PNG.

    `generated` is an optional date string for the footer; none is invented, so output is
    reproducible. Variants are identified as 'name@version'. Returns {"front": [...],
    "plotted": n (points drawn, source star included), "skipped": [without the metric or a size],
    "not_comparable": [{"name", "method_id", "method"}], "method_id": the plotted group's id}.
    """
    if y_metric not in Y_METRICS:
        raise ValueError(f"y_metric must be one of {Y_METRICS}, not {y_metric!r}")
    source_size = _source_size(rows)
    majority = majority_method(rows, y_metric)
    points, skipped, not_comparable = _split(rows, y_metric, majority)
    front = _front(points)
    front_names = [points[i]["label"] for i in front]
    y_unit = next((str(p["unit"]) for p in points if p["unit"]), "")
    y_method = next((p["method"] for p in points if p["method"]), None)

    png = _plot(points, front, source_size, y_metric, y_unit, title)
    if png_path is not None:
        _atomic_write(Path(png_path), png)
    table = _table_rows(rows, set(front_names), source_size)
    page = _template().render(
        title=title, y_metric=y_metric, y_unit=y_unit, plotted=len(points), on_front=len(front_names),
        method_id=str(majority), method=None if y_method is None else _fmt_method(y_method),
        png_base64=base64.b64encode(png).decode("ascii"), score_heads=[h for _, h, _ in _columns(rows)],
        rows=table, any_not_comparable=any(c["nc"] for r in table for c in r["scores"]),
        not_comparable=[{"name": nc["name"], "method_id": str(nc["method_id"]), "method": _fmt_method(nc["method"])}
                        for nc in not_comparable],
        skipped=skipped, generated=generated)
    _atomic_write(Path(html_path), page.encode("utf-8"))
    return {"front": front_names, "plotted": len(points), "skipped": skipped,
            "not_comparable": not_comparable, "method_id": majority}
