"""The variant report: the Pareto front on hand cases, and the HTML/PNG it writes on synthetic rows."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.report import pareto_front, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
M_A = {"window": 256, "stride": 256, "dataset_sha256": "ab12", "bos": True}
M_B = {"window": 128, "stride": 128, "dataset_sha256": "ab12", "bos": True}


@pytest.mark.parametrize(("points", "front"), [
    ([(1, 5), (2, 3), (3, 4), (4, 1)], [0, 1, 3]),           # (3, 4) is dominated by (2, 3)
    ([(2, 2), (2, 2), (1, 3), (3, 3)], [2, 0, 1]),           # equal points both kept; (3, 3) dominated
    ([(2, 1), (2, 3)], [0]),                                 # same x, worse y
    ([(1, 2), (3, 2)], [0]),                                 # same y, bigger x
    ([(7.0, 7.0)], [0]),
    ([], []),
    ([(1, float("nan")), (2, 2), (None, 0), (3, 1), (0, None)], [1, 3]),
    ([(4, 1), (3, 2), (2, 3), (1, 4)], [3, 2, 1, 0]),        # all on the front, returned by x
])
def test_pareto_front(points, front):
    assert pareto_front(points) == front


def _row(name, size, ppl=None, kl=None, method=M_A, runtime="openvino", version=1, **extra):
    scores = {}
    if ppl is not None:
        scores["perplexity"] = {"value": ppl, "unit": "ppl", "method": method, "method_id": str(method["window"])}
    if kl is not None:
        scores["kl_divergence"] = {"value": kl, "unit": "nats", "method": method, "method_id": str(method["window"])}
    scores["decode_tokens_per_s"] = {"value": 150.25, "unit": "tok/s", "method": {}, "method_id": "s"}
    return {"name": name, "version": version, "runtime": runtime, "weight_dtype": "int4", "group_size": 32,
            "size_bytes": size, "source_size_bytes": 14_428_832, "scores": scores, **extra}


ROWS = [
    _row("src", 14_428_832, ppl=180.0, kl=0.0, runtime="transformers", is_source=True),
    _row("int8-ov", 7_300_000, ppl=181.0, kl=0.002),
    _row("int4-ov", 3_900_000, ppl=201.3, kl=0.0123),
    _row("int4-ort", 3_880_000, ppl=199.0, kl=0.0150, runtime="onnxruntime-genai"),
    _row("int4-big", 5_000_000, ppl=210.0, kl=0.02, runtime="onnxruntime-genai"),   # dominated
    _row("<b>evil</b>&co", 2_000_000, ppl=260.0, kl=0.05),
    _row("other-window", 1_000_000, ppl=100.0, kl=0.001, method=M_B),               # not comparable
    _row("no-eval", 3_000_000),                                                     # skipped
]


def test_write_report(tmp_path: Path):
    html_path, png_path = tmp_path / "out" / "report.html", tmp_path / "out" / "report.png"
    res = write_report(ROWS, html_path, png_path, title="wt2 <sweep>")
    page = html_path.read_text(encoding="utf-8")

    assert "&lt;b&gt;evil&lt;/b&gt;&amp;co@1" in page and "<b>evil" not in page
    for r in ROWS:
        if r["name"] != "<b>evil</b>&co":
            assert f"{r['name']}@1" in page
    assert "wt2 &lt;sweep&gt;" in page
    assert "data:image/png;base64," in page
    low = page.lower()
    assert "http://" not in low and "https://" not in low and "<script" not in low and "<link" not in low

    png = png_path.read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000

    # the frontier is pareto_front over the comparable, non-source variants
    variants = [r for r in ROWS[1:6]]
    pts = [(r["size_bytes"], r["scores"]["perplexity"]["value"]) for r in variants]
    assert res["front"] == [f"{variants[i]['name']}@1" for i in pareto_front(pts)]
    assert res["front"] == ["<b>evil</b>&co@1", "int4-ort@1", "int8-ov@1"]
    assert res["plotted"] == 6  # five variants + the source star
    assert res["skipped"] == ["no-eval@1"]
    assert [nc["name"] for nc in res["not_comparable"]] == ["other-window@1"]
    assert res["not_comparable"][0]["method"] == M_B and res["method_id"] == "256"
    assert "not comparable (different evaluation method)" in low

    # frontier rows are starred and bold; the source is not a frontier row; missing values are dashes
    assert '<tr class="front"><td class="l">\u2605 int4-ort@1' in page
    assert '<tr class="source"><td class="l">src@1 (source)' in page
    assert "\u2013" in page
    # sorted by size, smallest first
    assert page.index("other-window@1") < page.index("int4-ort@1") < page.index("int8-ov@1") < page.index("src@1")
    assert not list(tmp_path.glob("out/.*.tmp"))  # atomic writes leave no temp files


def test_report_marks_other_methods_and_names_the_plotted_one(tmp_path: Path):
    write_report(ROWS, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "method 256: <code>bos=True, dataset_sha256=ab12, stride=256, window=256</code>" in page
    assert '<td class="nc" title="different evaluation method (method_id 128)">100.00 \u2020</td>' in page
    assert "\u2020 measured with a different evaluation method than most rows" in page
    assert "<li>other-window@1: method 128 <code>bos=True, dataset_sha256=ab12, stride=128, window=128</code>" in page
    assert "<li>no-eval@1</li>" in page and page.endswith("</body></html>\n")


def test_report_is_deterministic_and_kl(tmp_path: Path):
    a = write_report(ROWS, tmp_path / "a.html", tmp_path / "a.png", y_metric="kl_divergence")
    b = write_report(ROWS, tmp_path / "b.html", tmp_path / "b.png", y_metric="kl_divergence")
    assert a == b and a["front"] == ["<b>evil</b>&co@1", "int4-ort@1", "int4-ov@1", "int8-ov@1"]
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()
    assert "generated" not in (tmp_path / "a.html").read_text()
    write_report(ROWS, tmp_path / "c.html", generated="2025-01-02")
    assert "generated 2025-01-02" in (tmp_path / "c.html").read_text()


def test_report_edge_cases(tmp_path: Path):
    # nothing plottable still writes a page and a PNG; user strings with '$' do not break mathtext
    res = write_report([_row("a$b$", 1000, runtime="$x^$"), _row("nan", 2000, ppl=math.nan)],
                       tmp_path / "r.html", tmp_path / "r.png", title="$\\frac{")
    assert res["plotted"] == 0 and res["front"] == [] and res["skipped"] == ["a$b$@1", "nan@1"]
    assert (tmp_path / "r.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError):
        write_report([], tmp_path / "x.html", y_metric="top1_agreement")


def test_import_is_light():
    code = "import sys, engine.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
