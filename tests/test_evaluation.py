"""Evaluation end to end: scores recorded and compared, cached as steps, sweeps, the report.

The quick tests run on a synthetic model; the trained-model ones run models/wt2-phi3-7m (shipped) on
the WikiText-2 test slice in data/ and check the numbers against an independent transformers computation."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
from clirun import engine, private_copy
from runtimes_present import ready_runtimes

pytest.importorskip("onnxruntime_genai", reason="the onnxruntime-genai runtime is not installed")

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "models" / "wt2-phi3-7m"  # both ship with the repository
WIKI = ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"
TEXT = ("The river rises in the hills and flows west through the old town , where a stone bridge was built "
        "in the twelfth century . Its valley was farmed for many generations , and the town grew around "
        "the market that was held beside the water every week . ") * 40




def scores(cwd: Path, name: str) -> dict:
    return {m: s["value"] for m, s in json.loads(engine("show", name, "--json", cwd=cwd).stdout)["scores"].items()}


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> Path:
    """A synthetic sweep int8 x int4 on onnxruntime-genai, evaluated on a text the test writes."""
    work = tmp_path_factory.mktemp("eval")
    (work / "text.txt").write_text(TEXT)
    (work / "sweep.yaml").write_text("""\
name: ev-{weight_dtype}
source: {synthetic: {architecture: phi3, seed: 0}}
quantization: {group_size: 32}
target: {runtime: onnxruntime-genai}
matrix:
  quantization.weight_dtype: [int8, int4, nf4]
eval:
  perplexity: {dataset: text.txt, window: 64, max_windows: 4}
  speed: {prompt_tokens: 16, new_tokens: 8}
""")
    proc = engine("apply", "sweep.yaml", cwd=work)
    assert "skipped ev-nf4" in proc.stderr and "not supported by runtime 'onnxruntime-genai'" in proc.stderr
    return work


def test_scores_recorded_with_their_method(swept):
    doc = json.loads(engine("show", "ev-int8", "--json", cwd=swept).stdout)
    s = doc["scores"]
    assert {"perplexity", "source_perplexity", "kl_divergence", "top1_agreement", "size_bytes", "size_ratio",
            "load_seconds", "prefill_tokens_per_s", "decode_tokens_per_s"} <= set(s)
    assert s["perplexity"]["method"] == {"bos": True, "dataset_sha256": s["perplexity"]["method"]["dataset_sha256"],
                                         "fidelity": True, "max_windows": 4, "stride": 64, "window": 64}
    assert s["perplexity"]["versions"]["onnxruntime-genai"] and s["perplexity"]["engine_version"]
    assert s["decode_tokens_per_s"]["method"]["threads"] == os.cpu_count()
    assert s["size_bytes"]["value"] == doc["size_bytes"]
    assert math.isfinite(s["perplexity"]["value"]) and s["kl_divergence"]["value"] >= 0
    assert [st["kind"] for st in doc["steps"]] == ["source", "build", "reference", "eval"]


def test_int8_is_closer_to_the_source_than_int4(swept):
    int8, int4 = scores(swept, "ev-int8"), scores(swept, "ev-int4")
    assert int8["kl_divergence"] < int4["kl_divergence"]
    assert int8["top1_agreement"] >= int4["top1_agreement"]
    assert int8["source_perplexity"] == int4["source_perplexity"]  # one reference pass, shared


@pytest.fixture
def own(swept, tmp_path) -> Path:
    """A private copy of the module's folder, for tests that change or damage it."""
    return private_copy(swept, tmp_path)


def test_reapply_is_a_no_op_and_window_change_rescores_without_rebuilding(own):
    swept = own
    out = engine("apply", "sweep.yaml", cwd=swept).stdout
    assert out.count("up to date, nothing rebuilt") == 2
    before = {n: json.loads(engine("show", n, "--json", cwd=swept).stdout) for n in ("ev-int8", "ev-int4")}
    sweep = swept / "sweep.yaml"
    sweep.write_text(sweep.read_text().replace("window: 64", "window: 32"))
    out = engine("apply", "sweep.yaml", cwd=swept).stdout
    assert "built (reference" in out and "build " not in out.replace("built (", "")
    for name, old in before.items():
        new = json.loads(engine("show", name, "--json", cwd=swept).stdout)
        assert new["version"] == old["version"] and new["artifact_key"] == old["artifact_key"]
        assert new["scores"]["perplexity"]["method"]["window"] == 32
        assert new["scores"]["perplexity"]["method_id"] != old["scores"]["perplexity"]["method_id"]
        build = [s for s in new["steps"] if s["kind"] == "build"][0]
        assert build["cached"] is True
    sweep.write_text(sweep.read_text().replace("window: 32", "window: 64"))
    assert engine("apply", "sweep.yaml", cwd=swept).stdout.count("nothing rebuilt") == 2  # both evals cached


def test_ls_marks_scores_of_different_methods_as_not_comparable(own):
    swept = own
    other = swept / "other.yaml"
    other.write_text("""\
name: ev-int4-w16
source: {synthetic: {architecture: phi3, seed: 0}}
quantization: {weight_dtype: int4, group_size: 32}
target: {runtime: onnxruntime-genai}
eval: {perplexity: {dataset: text.txt, window: 16, max_windows: 4}, speed: {enabled: false}}
""")
    engine("apply", "other.yaml", cwd=swept)
    out = engine("ls", cwd=swept).stdout
    assert "perplexity: not comparable across methods" in out and "window=16" in out
    diff = json.loads(engine("diff", "ev-int4", "ev-int4-w16", "--json", cwd=swept).stdout)
    assert diff["same_artifact"] and diff["files"]["changed"] == []
    ppl = next(s for s in diff["scores"] if s["metric"] == "perplexity")
    assert ppl["comparable"] is False and ppl["delta"] is None
    diff = json.loads(engine("diff", "ev-int8", "ev-int4", "--json", cwd=swept).stdout)
    kl = next(s for s in diff["scores"] if s["metric"] == "kl_divergence")
    assert kl["comparable"] and kl["delta"] > 0
    assert {"field": "quantization.weight_dtype", "a": "int8", "b": "int4"} in diff["recipe"]


def test_report_writes_html_and_png(swept):
    pytest.importorskip("matplotlib", reason="the report extra is not installed")
    out = engine("report", "ev-*", "-o", "r.html", cwd=swept).stdout
    assert "Pareto front:" in out
    html = (swept / "r.html").read_text()
    assert "ev-int8@1" in html and "ev-int4@1" in html and "data:image/png;base64," in html
    assert (swept / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _runtimes_present() -> list[str]:
    """Installed runtimes, onnxruntime-genai and openvino first (the pair this sweep was written for)."""
    return sorted(ready_runtimes(), key=lambda n: (n != "onnxruntime-genai", n != "openvino", n))


def test_trained_fixture_sweep_two_runtimes_two_dtypes(tmp_path):
    runtimes = _runtimes_present()[:2]
    if len(runtimes) < 2:
        pytest.skip("needs two runtimes installed")
    # OpenVINO's int8 is per-channel only (group -1) and onnxruntime-genai has no per-channel:
    # sweeping the group too shows the skipping of combinations a runtime cannot do
    (tmp_path / "sweep.yaml").write_text(f"""\
name: wt2-{{runtime}}-{{weight_dtype}}-g{{group_size}}
source: {{path: {FIXTURE}}}
quantization: {{scheme: asym}}
target: {{runtime: onnxruntime-genai}}
matrix:
  quantization.weight_dtype: [int8, int4]
  quantization.group_size: [-1, 32]
  target.runtime: {json.dumps(runtimes)}
eval:
  perplexity: {{dataset: {WIKI}, window: 256, max_windows: 8}}
""")
    proc = engine("apply", "sweep.yaml", cwd=tmp_path)
    assert "skipped wt2-onnxruntime-genai-int8-g-1" in proc.stderr
    rows = {r["name"]: r for r in json.loads(engine("ls", "--json", cwd=tmp_path).stdout)}
    assert len(rows) >= 4
    for runtime in runtimes:
        kl = {name: r["scores"]["kl_divergence"]["value"] for name, r in rows.items() if r["runtime"] == runtime}
        int8 = [v for name, v in kl.items() if "-int8-" in name]
        int4 = [v for name, v in kl.items() if "-int4-" in name]
        assert int8 and int4 and max(int8) < min(int4), (runtime, kl)
    assert len({r["scores"]["perplexity"]["method_id"] for r in rows.values()}) == 1
    source_ppl = next(iter(rows.values()))["scores"]["source_perplexity"]["value"]
    assert source_ppl == pytest.approx(_direct_perplexity(window=256, max_windows=8), rel=0.005)
    out = engine("report", "wt2-*", "-o", "report.html", cwd=tmp_path).stdout
    assert "Pareto front:" in out and (tmp_path / "report.png").is_file()
    assert engine("apply", "sweep.yaml", cwd=tmp_path).stdout.count("nothing rebuilt") == len(rows)


def _direct_perplexity(window: int, max_windows: int) -> float:
    """The same method written out directly with transformers: [BOS] + 256 tokens, all scored."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(FIXTURE)
    model = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    ids = tok(WIKI.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    for start in range(0, window * max_windows, window):
        chunk = torch.tensor([[tok.bos_token_id] + ids[start:start + window]])
        with torch.no_grad():
            loss = model(chunk, labels=chunk).loss.item()  # mean over the 256 predicted tokens
        total += loss * window
        count += window
    return math.exp(total / count)
