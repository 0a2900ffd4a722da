"""The variant report: a self-contained HTML page and a PNG Pareto plot of size vs quality.

A pure library (no registry access): the CLI gathers one row per variant and calls `write_report`.
Only scores with the same `method_id` are compared, because a perplexity measured with another
window or dataset is a different number. matplotlib is imported inside `write_report` so that
`import engine.report` stays cheap for the CLI.
"""
from __future__ import annotations

import base64
import html
import io
import math
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

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
_MISSING = "\u2013"  # en dash
_MB = 1e6

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.5em}
img{max-width:100%;border:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em}
th,td{padding:.3em .7em;border-bottom:1px solid #e3e3e3;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
tr.front td{font-weight:bold;background:#fff8dc}
tr.source td{font-style:italic;color:#555}
.nc{color:#b00}.muted{color:#777;font-size:.85em}code{font-size:.85em}
"""


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
    s = (row.get("scores") or {}).get(metric)
    return s if isinstance(s, dict) and _num(s.get("value")) is not None else None


def _majority_method(rows: list[dict], metric: str) -> str | None:
    """The method_id shared by most rows for `metric` (ties: first seen), which defines 'comparable'.

    Variants outvote the source row, so one odd source score cannot hide every variant.
    """
    counts: Counter[str | None] = Counter()
    for r in rows:
        if (s := _score(r, metric)) is not None:
            counts[s.get("method_id")] += 0 if r.get("is_source") else 1
    return max(counts, key=lambda k: counts[k]) if counts else None  # max keeps the first on ties


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


def _cell(row: dict, metric: str, fmt: str, majority: str | None) -> str:
    """One score cell; a score measured by a minority method is flagged rather than compared."""
    s = _score(row, metric)
    if s is None:
        return f"<td>{_MISSING}</td>"
    text = html.escape(fmt.format(float(s["value"])))
    if s.get("method_id") != majority:
        tip = html.escape(f"different evaluation method (method_id {s.get('method_id')})", quote=True)
        return f'<td class="nc" title="{tip}">{text} \u2020</td>'
    return f"<td>{text}</td>"


def _fmt_method(method: Any) -> str:
    if isinstance(method, dict):
        return ", ".join(f"{k}={v}" for k, v in sorted(method.items(), key=lambda kv: str(kv[0])))
    return str(method)


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
    html_path = Path(html_path)
    source_size = _source_size(rows)
    majority = _majority_method(rows, y_metric)

    points: list[dict] = []
    skipped: list[str] = []
    not_comparable: list[dict] = []
    y_unit = ""
    y_method: Any = None
    for r in rows:
        s, size = _score(r, y_metric), _num(r.get("size_bytes"))
        if s is None or size is None:
            skipped.append(_ref(r))
        elif s.get("method_id") != majority:
            not_comparable.append({"name": _ref(r), "method_id": s.get("method_id"), "method": s.get("method")})
        else:
            y_unit, y_method = y_unit or str(s.get("unit") or ""), y_method or s.get("method")
            points.append({"label": _ref(r), "x": size / _MB, "y": float(s["value"]),
                           "runtime": r.get("runtime"), "source": bool(r.get("is_source"))})

    candidates = [i for i, p in enumerate(points) if not p["source"]]
    front = [candidates[j] for j in pareto_front([(points[i]["x"], points[i]["y"]) for i in candidates])]
    front_names = [points[i]["label"] for i in front]

    png = _plot(points, front, source_size, y_metric, y_unit, title)
    if png_path is not None:
        _atomic_write(Path(png_path), png)

    on_front = set(front_names)
    majorities = {m: _majority_method(rows, m) for m, _, _ in _COLUMNS}
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    summary = f"{len(points)} plotted, {len(front_names)} on the frontier (\u2605)"
    out.append(f"<p>y = <b>{e(y_metric)}</b> ({e(y_unit or '')}), lower is better; {e(summary)}.")
    if y_method is not None:
        out.append(f'<br><span class="muted">method {e(str(majority))}: <code>{e(_fmt_method(y_method))}</code></span>')
    out.append("</p>")
    b64 = base64.b64encode(png).decode("ascii")
    out.append(f'<img alt="{e(y_metric)} vs size, Pareto frontier" src="data:image/png;base64,{b64}">')

    out.append("<h2>Variants</h2><table><thead><tr>")
    heads = ["variant", "runtime", "dtype", "group", "size MB", "\u00d7 source"] + [h for _, h, _ in _COLUMNS]
    out.extend(f'<th class="{"l" if i < 3 else ""}">{e(h)}</th>' for i, h in enumerate(heads))
    out.append("</tr></thead><tbody>")

    def order(r: dict) -> tuple:
        size = _num(r.get("size_bytes"))
        return (size is None, size or 0.0, str(r.get("name")), str(r.get("version")))

    for r in sorted(rows, key=order):
        ref, size = _ref(r), _num(r.get("size_bytes"))
        cls = "front" if ref in on_front and not r.get("is_source") else ("source" if r.get("is_source") else "")
        mark = "\u2605 " if cls == "front" else ""
        tag = " (source)" if r.get("is_source") else ""
        cells = [f'<td class="l">{mark}{e(ref)}{tag}</td>',
                 f'<td class="l">{e(str(r.get("runtime") or _MISSING))}</td>',
                 f'<td class="l">{e(str(r.get("weight_dtype") or _MISSING))}</td>',
                 f"<td>{e(str(r['group_size'])) if r.get('group_size') is not None else _MISSING}</td>",
                 f"<td>{size / _MB:.2f}</td>" if size is not None else f"<td>{_MISSING}</td>",
                 f"<td>{size / source_size:.3f}</td>" if size is not None and source_size else f"<td>{_MISSING}</td>"]
        cells += [_cell(r, m, fmt, majorities[m]) for m, _, fmt in _COLUMNS]
        out.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    if any('class="nc"' in line for line in out):
        out.append('<p class="muted">\u2020 measured with a different evaluation method than most rows: not comparable.</p>')

    if not_comparable:
        out.append("<h2>Not comparable (different evaluation method)</h2><ul>")
        for nc in not_comparable:
            out.append(f"<li>{e(nc['name'])}: method {e(str(nc['method_id']))} "
                       f"<code>{e(_fmt_method(nc['method']))}</code></li>")
        out.append("</ul>")
    if skipped:
        out.append(f"<h2>Skipped (no {e(y_metric)} or size)</h2><ul>")
        out.extend(f"<li>{e(n)}</li>" for n in skipped)
        out.append("</ul>")
    if generated:
        out.append(f'<p class="muted">generated {e(generated)}</p>')
    out.append("</body></html>\n")
    _atomic_write(html_path, "\n".join(out).encode("utf-8"))
    return {"front": front_names, "plotted": len(points), "skipped": skipped,
            "not_comparable": not_comparable, "method_id": majority}
