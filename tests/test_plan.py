"""Planning in-process: the keys of known recipes are pinned, as DVC pins stage hashes.

A key changes only on purpose: bump the step's version and say so in CHANGELOG.md, then update the
pins. Versions are a fixed table here ("9.9.9-<dist>"), so the pins do not move with the installed
libraries; these values are the ones the engine computed before the house renovation (0.1.0), so
existing stores and registries keep working.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from engine.plan import make_plan
from engine.recipe import load_recipe, load_recipes
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]


def fixed(dist: str) -> str:
    return "9.9.9-" + dist


#: recipe name (in recipes/) -> (source key, build key)
PINNED = {
    # issue 16: demo-tiny-int4 leaves compute_dtype out, so it now gets onnxruntime-genai's CPU default
    # (int8, accuracy level 4) instead of fp32 (level 1): a new build key, on purpose (CHANGELOG.md).
    # Before: "ebef59a1dd2ff8e2ceb93b45c2731e1d0954a3fcca893fb20cef742f27c1bd4a".
    "demo-tiny-int4": ("8e6c0b1ed7697cf0d67bbadf04a07f448da23ac3e2af441b5ca9713fbe8b6434",
                       "004be891863d21a81fcbc5eb325644983bf8ba488a3a10b754cce6ca360721ae"),
    # issue 16: the flagship recipe itself now says `compute_dtype: int8` (it said fp32): a new recipe,
    # so a new key. Its old text still gives the old key (test_explicit_compute_dtype_keeps_its_key).
    "phi35-int4-cpu": ("9940801ecf65f008d09bdfbce9d5201e1e6f2cc41c2ac36c849e9f7d4fa8ba61",
                       "0231dfd4ad4a5adf721a6820bf9b565ce81adfa9bb4645937f4d12076474f968"),
    "phi35-int4-ov-awq": ("9940801ecf65f008d09bdfbce9d5201e1e6f2cc41c2ac36c849e9f7d4fa8ba61",
                          "a0f49a29afa335aa1bad9cda4232feb12d55ab03687ab3b2a421723aeef71588"),
    "phi35-int8-ov": ("9940801ecf65f008d09bdfbce9d5201e1e6f2cc41c2ac36c849e9f7d4fa8ba61",
                      "1b3cacf0e67747a6a76a6c59925c2f6634c63fa853b6d54ad178cede0ca1686f"),
    "phi35-int4-itrex-gptq": ("9940801ecf65f008d09bdfbce9d5201e1e6f2cc41c2ac36c849e9f7d4fa8ba61",
                              "40c97cbfb9bd1eec8966f42cc304754f4b215a34fe8c24c9ed13318aa4cf8d91"),
    "phi35-nf4-itrex": ("9940801ecf65f008d09bdfbce9d5201e1e6f2cc41c2ac36c849e9f7d4fa8ba61",
                        "081719dc881581a3d739fd41b483f2309ed299d1de01b61db31e23e1da370cf6"),
}


def _recipes() -> dict:
    found = {}
    for path in sorted((ROOT / "recipes").glob("*.yaml")):
        for recipe in load_recipes(path)[0]:
            found[recipe.name] = recipe
    return found


@pytest.mark.parametrize("name", sorted(PINNED))
def test_recipe_keys_are_pinned(name, tmp_path):
    plan = make_plan(_recipes()[name], Store(tmp_path / "store"), versions=fixed)
    assert (plan.steps[0].key, plan.build.key) == PINNED[name]
    assert [s.status for s in plan.steps][1:] == ["missing"]


def test_path_source_and_eval_keys_are_pinned(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "phi3"}')
    (tmp_path / "model" / "model.safetensors").write_bytes(b"\0" * 64)
    (tmp_path / "text.txt").write_text("The river rises in the hills.\n")
    (tmp_path / "r.yaml").write_text("""\
name: pinned-path-eval
source: {path: model}
quantization: {weight_dtype: int4, group_size: 64, scheme: asym}
target: {runtime: onnxruntime-genai, options: {accuracy_level: 4}}
eval:
  perplexity: {dataset: text.txt, window: 64, max_windows: 2}
  speed: {prompt_tokens: 16, new_tokens: 8}
""")
    plan = make_plan(load_recipe(tmp_path / "r.yaml"), Store(tmp_path / "store"), versions=fixed)
    assert {s.kind: s.key for s in plan.steps} == {
        "source": "4c5b0d03ff50f94c7d021d5a8cb80efb760e8f976d7140273eb5fa71a437126d",
        "build": "eea196916a2191e6e47ce291ac7ec2b0c8f9250a947fbbe8198cd28235805a6a",
        "reference": "976e355c1c0e248c79e90e1a23ae1a1508c73e697a90fdd8af05787296760c05",
        "eval": "2a859248237d5a801359fbe4ca5e43ca35ec431250c042cbdd32a00149dbd07d",
    }
    assert [s.status for s in plan.steps] == ["local", "missing", "missing", "missing"]


def test_explicit_compute_dtype_keeps_its_key(tmp_path):
    """The new onnxruntime-genai default changes keys only for recipes that leave compute_dtype out:
    the flagship as it was written before issue 16 (compute_dtype: fp32) keeps its 0.1.0 key, and
    leaving the field out is the same as writing the default (int8)."""
    text = (ROOT / "recipes" / "phi35-int4-cpu.yaml").read_text()
    store = Store(tmp_path / "store")
    keys = {}
    for value in ("fp32", "int8", None):
        path = tmp_path / f"{value}.yaml"
        path.write_text(text.replace("compute_dtype: int8", f"compute_dtype: {value}" if value else ""))
        keys[value] = make_plan(load_recipe(path), store, versions=fixed).build.key
    assert keys["fp32"] == "df56deb848cdb9b2fc45d153f8e39e4bff29a8b29c1b6a055338c67e93ca1605"
    assert keys[None] == keys["int8"] == PINNED["phi35-int4-cpu"][1]
    omitted = load_recipe(tmp_path / "None.yaml")
    assert omitted.data["quantization"]["compute_dtype"] == "int8"
    assert make_plan(omitted, store, versions=fixed).build.params["accuracy_level"] == 4


def test_keys_follow_what_determines_the_artifact(tmp_path):
    base = _recipes()["phi35-int4-cpu"]
    store = Store(tmp_path / "store")
    key = make_plan(base, store, versions=fixed).build.key
    text = base.path.read_text()
    (tmp_path / "described.yaml").write_text(text.replace("description:", "description: changed,"))
    (tmp_path / "grouped.yaml").write_text(text.replace("group_size: 32", "group_size: 64"))
    assert make_plan(load_recipe(tmp_path / "described.yaml"), store, versions=fixed).build.key == key
    assert make_plan(load_recipe(tmp_path / "grouped.yaml"), store, versions=fixed).build.key != key
    upgraded = make_plan(base, store, versions=lambda d: "10.0" if d == "onnxruntime-genai" else fixed(d))
    assert upgraded.build.key != key


def test_core_never_imports_a_runtime():
    """The import graph: runtimes import the core, never the reverse (found by entry points)."""
    import ast

    core = [p for p in (ROOT / "engine").rglob("*.py") if "runtimes" not in p.parts]
    for path in core:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any("runtimes" in n for n in names), f"{path.relative_to(ROOT)} imports {names}"


def test_planning_a_cached_recipe_imports_no_runtime_library(tmp_path):
    import subprocess

    code = ("import sys, engine\nfrom engine.plan import make_plan\nfrom engine.store import Store\n"
            f"make_plan(engine.load_recipe({str(ROOT / 'recipes' / 'phi35-int4-ov-awq.yaml')!r}), Store('s'))\n"
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'openvino', 'optimum', 'nncf',"
            " 'huggingface_hub', 'neural_compressor') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr
