"""The demo and what a new user meets first (issue 16), through the real CLI on the trained model
that ships in models/wt2-phi3-7m: real scores, readable text, the defaults said, nothing registered
that cannot run, no library line on the terminal (clirun checks every run)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from clirun import engine

pytest.importorskip("onnxruntime_genai", reason="the onnxruntime-genai runtime is not installed (engine[ortgenai])")

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "data" / "models" / "stories260K"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """`make demo`'s apply, from a copy of the recipe and its model and data (relative paths kept)."""
    work = tmp_path_factory.mktemp("demo")
    for folder in ("recipes", "models", "data"):
        (work / folder).mkdir()
    shutil.copy(ROOT / "recipes" / "demo-wt2-int4.yaml", work / "recipes")
    shutil.copytree(ROOT / "models" / "wt2-phi3-7m", work / "models" / "wt2-phi3-7m")
    shutil.copytree(ROOT / "data" / "wikitext-2", work / "data" / "wikitext-2")
    proc = engine("apply", "recipes/demo-wt2-int4.yaml", cwd=work)
    assert "demo-wt2-int4@1: built" in proc.stdout
    text = (work / "recipes" / "demo-wt2-int4.yaml").read_text()
    (work / "recipes" / "keep-head.yaml").write_text(  # the same with lm_head left unquantized, not scored
        text.replace("name: demo-wt2-int4", "name: demo-keep-head").split("eval:")[0]
        .replace("  group_size: 32", "  skip_modules: [lm_head]\n  group_size: 32"))
    engine("apply", "recipes/keep-head.yaml", cwd=work)
    return work


def test_demo_shows_real_scores(demo):
    [row] = json.loads(engine("ls", "demo-wt2-*", "--json", cwd=demo).stdout)
    scores = {m: s["value"] for m, s in row["scores"].items()}
    # a trained model: perplexity near the source's (190 over the whole test split), int4 close to it
    assert 50 < scores["perplexity"] < 400 and scores["perplexity"] == pytest.approx(scores["source_perplexity"], rel=0.1)
    assert 0 < scores["kl_divergence"] < 0.05 and scores["top1_agreement"] > 0.8
    assert 0.3 < scores["size_ratio"] < 0.8 and scores["decode_tokens_per_s"] > 0
    table = engine("ls", cwd=demo).stdout
    assert table.splitlines()[0].split()[:3] == ["name", "ver", "runtime"]
    assert all(col in table for col in ("ppl", "KL", "top1", "size×")) and "demo-wt2-int4" in table


def test_demo_generates_words(demo):
    proc = engine("run", "demo-wt2-int4", "The album was released in", "--max-new-tokens", "16", cwd=demo)
    words = proc.stdout.split()
    assert proc.stdout.endswith("\n") and proc.stdout.startswith(" ") and len(words) >= 8
    assert sum(w.isalpha() for w in words) >= 5  # English words, not random characters
    assert proc.stderr == ""  # stdout is the answer; nothing else is printed


def test_show_says_which_values_were_defaults(demo):
    doc = json.loads(engine("show", "demo-wt2-int4", "--json", cwd=demo).stdout)
    assert doc["defaults"]["quantization.compute_dtype"] == "int8"  # onnxruntime-genai's CPU default
    assert "quantization.group_size" not in doc["defaults"]  # written in the recipe
    assert doc["steps"][1]["params"]["accuracy_level"] == 4
    text = engine("show", "demo-wt2-int4", cwd=demo).stdout
    assert "compute_dtype=\"int8\"" in text and "not written in the recipe" in text


def test_show_and_diff_say_what_each_kind_of_weight_became(demo):
    weights = json.loads(engine("show", "demo-wt2-int4", "--json", cwd=demo).stdout)["build_meta"]["weights"]
    # read from the ONNX graph: every Linear, lm_head included, is MatMulNBits 4-bit, block 32
    assert weights == {"attention": {"int4 g32": 12}, "mlp": {"int4 g32": 18}, "embeddings": {"fp32": 1},
                       "lm_head": {"int4 g32": 1}}
    diff = json.loads(engine("diff", "demo-wt2-int4", "demo-keep-head", "--json", cwd=demo).stdout)
    assert [(w["kind"], w["a"], w["b"]) for w in diff["weights"] if not w["same"]] == [
        ("lm_head", "int4 g32 x1", "fp32 x1")]
    assert "differs" in engine("diff", "demo-wt2-int4", "demo-keep-head", cwd=demo).stdout


def test_ls_filters_sorts_and_limits(demo):
    assert engine("ls", "demo-*", "--runtime", "onnxruntime-genai", "--dtype", "int4", "--sort", "kl",
                  "--limit", "1", cwd=demo).stdout.count("demo-wt2-int4") == 1  # scored first, then the unscored
    assert [r["name"] for r in json.loads(engine("ls", "--json", "--sort", "size", cwd=demo).stdout)] == [
        "demo-wt2-int4", "demo-keep-head"]
    assert json.loads(engine("ls", "other-*", "--json", cwd=demo).stdout) == []
    assert "no matching variants" in engine("ls", "--runtime", "openvino", cwd=demo).stderr


@pytest.mark.shared_data
def test_a_build_that_cannot_run_is_not_registered(tmp_path):
    """stories260K (head size 8) builds on onnxruntime-genai but cannot run there: the build fails
    with onnxruntime's words and a hint, keeps the log, registers nothing, stores nothing."""
    if not STORIES.is_dir():
        pytest.skip(f"needs {STORIES} (../shared/data beside the project)")
    (tmp_path / "s.yaml").write_text(f"name: stories-int8\nsource: {{path: {STORIES}}}\n"
                                     "quantization: {weight_dtype: int8, group_size: 32}\n"
                                     "target: {runtime: onnxruntime-genai}\n")
    proc = engine("apply", "s.yaml", cwd=tmp_path, check=1)
    assert "onnxruntime-genai built stories-int8 but cannot run it" in proc.stderr
    assert "head_size shall be a multiple of 16" in proc.stderr
    assert "hint:" in proc.stderr and "openvino, itrex" in proc.stderr and "Traceback" not in proc.stderr
    kept = list((tmp_path / ".engine" / "failed").iterdir())
    assert len(kept) == 1 and (kept[0] / "build.log").is_file()
    assert json.loads(engine("ls", "--json", cwd=tmp_path).stdout) == []
    assert not list((tmp_path / ".engine").glob("artifacts/*/*"))
