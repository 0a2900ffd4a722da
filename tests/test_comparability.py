"""The comparability rule on hand cases, and `engine ls`, `diff` and `report` agreeing on it."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from engine.comparability import comparable, majority_method, measured_by, method_letters, present
from engine.diff import diff_variants
from engine.records import VariantRecord
from engine.render import ls_table
from engine.report import write_report

W256 = {"window": 256, "stride": 256, "dataset_sha256": "ab12", "bos": True}
W128 = {"window": 128, "stride": 128, "dataset_sha256": "ab12", "bos": True}


def _s(value, method_id="m1", method=W256):
    return {"value": value, "unit": "ppl", "method": method, "method_id": method_id}


@pytest.mark.parametrize(("score", "ok"), [
    (_s(1.5), True), (_s(0), True), (_s(math.nan), False), (_s(math.inf), False), (_s(None), False),
    (_s(True), False), (_s("1.5"), False), ({"method_id": "m1"}, False), (None, False), ({}, False),
])
def test_present(score, ok):
    assert present(score) is ok


@pytest.mark.parametrize(("a", "b", "ok"), [
    (_s(1.0), _s(2.0), True),
    (_s(1.0), _s(2.0, "m2"), False),           # another window or dataset: another number
    (_s(1.0), None, False),
    (None, None, False),
    (_s(1.0), _s(math.nan), False),            # NaN is no measurement
    (_s(1.0, None), _s(2.0, None), True),      # both unlabelled: the same (unknown) method
])
def test_comparable_is_symmetric(a, b, ok):
    assert comparable(a, b) is ok and comparable(b, a) is ok


def test_measured_by():
    assert measured_by(_s(1.0), "m1") and not measured_by(_s(1.0), "m2") and not measured_by(None, "m1")


def test_method_letters():
    scored = [{"perplexity": _s(1, "m2"), "kl": _s(1, "k")}, {"perplexity": _s(2, "m1"), "kl": _s(2, "k")},
              {"perplexity": _s(math.nan, "m3")}, {}]
    letters = method_letters(scored, ["perplexity", "kl", "absent"])
    assert letters == {"perplexity": {"m1": "a", "m2": "b"}}  # sorted ids; one method or none: no letters
    assert method_letters(reversed(scored), ["perplexity"]) == letters  # independent of row order


def _rows(*ids, source=None):
    rows = [{"scores": {"perplexity": _s(1.0, mid)}} for mid in ids]
    return rows + ([{"is_source": True, "scores": {"perplexity": _s(1.0, source)}}] if source else [])


@pytest.mark.parametrize(("rows", "majority"), [
    (_rows("a", "b", "b"), "b"),
    (_rows("a", "b"), "a"),                     # ties: the first seen
    (_rows("a", source="s"), "a"),              # the source never outvotes a variant ...
    (_rows(source="s"), "s"),                   # ... but decides when it is alone
    (_rows(), None),
    ([{"scores": {"perplexity": _s(math.nan, "x")}}, *_rows("a")], "a"),
])
def test_majority_method(rows, majority):
    assert majority_method(rows, "perplexity") == majority


def test_import_is_pure():
    code = "import sys, engine.comparability; print({'rich', 'jinja2', 'matplotlib'} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "set()"


def _variant(name: str, score: dict) -> tuple[VariantRecord, dict]:
    """A registered variant (what ls and diff read) and a report row, both with one score."""
    row = VariantRecord.from_row({
        "name": name, "version": 1, "runtime": "openvino", "device": "cpu", "weight_dtype": "int4", "group_size": 32,
        "scheme": "sym", "algorithm": "rtn", "size_bytes": 1_000_000, "created": "2025-01-01",
        "recipe_json": json.dumps({"name": name}), "artifact_key": name})
    report_row = {"name": name, "version": 1, "runtime": "openvino", "size_bytes": row.size_bytes,
                  "scores": {"perplexity": score}}
    return row, report_row


@pytest.mark.parametrize(("sa", "sb"), [
    (_s(180.0, "m1", W256), _s(181.5, "m1", W256)),
    (_s(180.0, "m1", W256), _s(181.5, "m2", W128)),
])
def test_ls_diff_and_report_agree(sa, sb, tmp_path: Path):
    (va, ra), (vb, rb) = _variant("a", sa), _variant("b", sb)
    expected = comparable(sa, sb)

    table, notes = ls_table([va, vb], [{"perplexity": sa}, {"perplexity": sb}])
    console = Console(record=True, width=200)
    console.print(table)
    ls_says = "(a)" not in console.export_text() and not notes

    d = diff_variants(va, vb, [], [], {"perplexity": sa}, {"perplexity": sb})["scores"][0]
    diff_says = d["comparable"] and d["delta"] == pytest.approx(1.5)

    res = write_report([ra, rb], tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    report_says = not res["not_comparable"] and "\u2020" not in page and res["plotted"] == 2

    assert ls_says is diff_says is report_says is expected
