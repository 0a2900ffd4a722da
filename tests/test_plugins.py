"""A runtime shipped by a third party: found through the `engine.runtimes` entry-point group,
validated against its own declaration, applied, registered, shown and loaded by name. The runtime
is defined in tests/plugins; nothing is installed: the test writes a dist-info folder that declares
the entry point and puts both folders on PYTHONPATH of the real CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from toyplugin import make_model, toy_env


@pytest.fixture()
def work(tmp_path: Path) -> tuple[Path, dict]:
    pytest.importorskip("safetensors")
    make_model(tmp_path / "model")
    return tmp_path, toy_env(tmp_path)


def run(work: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)


def test_third_party_runtime_applies_registers_and_loads(work):
    folder, env = work
    (folder / "toy.yaml").write_text("name: toy-int8\nsource: {path: model}\n"
                                     "quantization: {weight_dtype: int8, group_size: -1}\ntarget: {runtime: toy}\n")
    proc = run(folder, env, "apply", "toy.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "toy-int8@1: built" in proc.stdout
    shown = json.loads(run(folder, env, "show", "toy-int8", "--json").stdout)
    assert shown["runtime"] == "toy" and shown["build_meta"]["tensors"] == 2
    assert shown["sections"] == [{"title": "toy storage", "columns": ["what", "as"], "rows": [["weights", "int8 per row"]]}]
    assert "numpy" in shown["steps"][1]["versions"]  # the declared distributions key its cache
    assert "toy storage" in run(folder, env, "show", "toy-int8").stdout
    code = ("import engine; m = engine.load('toy-int8', repeat=65); "
            "print(m.generate('hi', max_new_tokens=3), list(m.stream('hi', max_new_tokens=2)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["AAA", "['A',", "'A']"], out.stderr
    code = ("import engine\ntry: engine.load('toy-int8', threads=2)\n"
            "except engine.EngineError as e: print(e.message, '|', e.hint)")
    bad = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
    assert "unknown load option(s) for runtime 'toy': threads | runtime 'toy' takes repeat" in bad.stdout, bad.stderr
    again = run(folder, env, "apply", "toy.yaml")
    assert "up to date, nothing rebuilt" in again.stdout


def test_declaration_is_the_schema(work):
    folder, env = work
    schema = json.loads(run(folder, env, "schema", "--runtime", "toy").stdout)
    quant = schema["properties"]["quantization"]["properties"]
    assert quant["weight_dtype"]["enum"] == ["int8"] and quant["algorithm"]["enum"] == ["rtn"]
    assert schema["properties"]["target"]["properties"]["device"]["enum"] == ["cpu"]
    assert "toy" in json.loads(run(folder, env, "schema").stdout)["properties"]["target"]["properties"]["runtime"]["enum"]
    (folder / "bad.yaml").write_text("name: toy-nf4\nsource: {path: model}\nquantization: {weight_dtype: nf4}\n"
                                     "target: {runtime: toy, device: gpu}\n")
    proc = run(folder, env, "validate", "bad.yaml")
    assert proc.returncode == 3
    assert "quantization.weight_dtype: 'nf4' is not supported by runtime 'toy' (supported: int8)" in proc.stderr
    assert "target.device: 'gpu' is not supported by runtime 'toy' (supported: cpu)" in proc.stderr


def test_without_the_plugin_the_runtime_is_unknown(tmp_path):
    (tmp_path / "toy.yaml").write_text("name: t\nsource: {path: model}\ntarget: {runtime: toy}\n")
    proc = subprocess.run([sys.executable, "-m", "engine", "validate", "toy.yaml"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 3 and "target.runtime: 'toy' is not one of" in proc.stderr
    assert "onnxruntime-genai" in proc.stderr


def test_library_applies_a_sweep_verifies_and_collects(work):
    """engine.apply() takes a sweep (results per variant, skip reasons); verify and gc are library calls."""
    folder, env = work
    (folder / "sweep.yaml").write_text("name: toy-{weight_dtype}-g{group_size}\nsource: {path: model}\n"
                                       "target: {runtime: toy}\nmatrix:\n  quantization.weight_dtype: [int8, nf4]\n"
                                       "  quantization.group_size: [-1, 32]\n")
    code = """
import json, engine
result = engine.apply("sweep.yaml")
print(json.dumps({"built": sorted(r.variant.ref for r in result.results), "failed": [o.name for o in result.failed],
                  "skipped": sorted(s.name for s in result.skipped), "reasons": [s.reason for s in result.skipped]}))
reports = engine.verify()
print(json.dumps([r.variant for r in reports if r.ok]))
engine.Registry("registry.db").remove("toy-int8-g32")
print(json.dumps([f.size > 0 for f in engine.gc(dry_run=True).entries]))
print(len(engine.gc().entries), len(engine.gc(dry_run=True).entries))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    applied, verified, collectable, collected = out.stdout.splitlines()
    applied = json.loads(applied)
    assert applied["built"] == ["toy-int8-g-1@1", "toy-int8-g32@1"] and applied["failed"] == []
    assert applied["skipped"] == ["toy-nf4-g-1", "toy-nf4-g32"]
    assert all("not supported by runtime 'toy'" in r for r in applied["reasons"])
    assert json.loads(verified) == ["toy-int8-g-1@1", "toy-int8-g32@1"]
    assert json.loads(collectable) == [True]  # the removed variant's artifact (the path source is no entry)
    assert collected == "1 0"
