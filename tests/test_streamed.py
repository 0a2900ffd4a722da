"""The layer-by-layer reference pass (engine.streamed) computes what the whole-model pass computes:
same log-probabilities, same perplexity, on the architectures we ship (phi3, llama, tied or not), so
both share the reference step's key; the plan switches to it only where the whole pass would not fit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from clirun import make_synthetic_in_child

from engine.admission import choose_reference_pass
from engine.evaluation import compute_reference
from engine.plan import make_plan
from engine.recipe import load_recipes
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"
SHARED = ROOT.parent / "shared" / "data" / "models"
#: stated tolerance: relative 1e-4 on perplexity, 1e-5 nats on any log-probability (the passes run the
#: same fp32 operations in the same order, so in practice they agree exactly)
PPL_REL, LOGPROB_ABS = 1e-4, 1e-5


def _synthetic_llama(folder: Path) -> Path:
    spec = {"architecture": "llama", "hidden_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}
    return make_synthetic_in_child(spec, folder)


def _models(tmp_path: Path) -> list[Path]:
    found = [ROOT / "models" / "wt2-phi3-7m", _synthetic_llama(tmp_path / "llama")]
    if (SHARED / "stories260K").is_dir():  # a real llama with tied embeddings
        found.append(SHARED / "stories260K")
    return found


def test_streamed_and_whole_model_reference_agree(tmp_path):
    pytest.importorskip("torch")
    spec = {"perplexity": {"window": 128, "stride": 128, "max_windows": 3, "bos": False,
                           "_files": [str(DATA)], "_hub": None}}
    for model in _models(tmp_path):
        out = {}
        for streamed in (False, True):
            folder = tmp_path / f"{model.name}-{streamed}"
            folder.mkdir()
            out[streamed] = (compute_reference(model, spec, folder, lambda m: None, streamed=streamed), folder)
        (whole, whole_dir), (streamed_meta, streamed_dir) = out[False], out[True]
        assert streamed_meta["pass"] == "streamed" and whole["pass"] == "whole"
        assert streamed_meta["source_perplexity"] == pytest.approx(whole["source_perplexity"], rel=PPL_REL), model
        for path in sorted(whole_dir.glob("ref-*.npy")):
            gap = np.abs(np.load(path) - np.load(streamed_dir / path.name)).max()
            assert gap <= LOGPROB_ABS, (model.name, path.name, gap)


RECIPE = f"""\
name: big-reference
source:
  path: {ROOT / "models" / "wt2-phi3-7m"}
quantization: {{weight_dtype: int4, group_size: 32}}
target: {{runtime: onnxruntime-genai}}
eval:
  perplexity: {{dataset: {DATA}, window: 128, max_windows: 2}}
"""


def test_the_plan_streams_only_where_the_whole_pass_would_not_fit_and_keeps_the_key(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    (recipe,), _ = load_recipes(tmp_path / "r.yaml")
    plan = make_plan(recipe, Store(tmp_path / "store"))
    step = plan.step("reference")
    key, whole = step.key, step.memory_estimate
    assert not step.inputs.get("streamed")  # this machine holds the 7 M model whole
    choose_reference_pass(plan, whole - 1)  # a bound the whole pass would exceed
    assert step.inputs["streamed"] and step.memory_estimate < whole and "layer by layer" in step.detail
    assert step.key == key  # same scores, same key
    choose_reference_pass(plan, 10 * whole)
    assert not step.inputs.get("streamed") and step.memory_estimate == whole
