"""Runtime `transformers` and build environments, through the real CLI.

The build environment is created for real from the package index, once per session (ENGINE_ENVS,
tests/conftest.py), by the first build; a tiny seeded Phi-3 is quantized with llm-compressor GPTQ
(int4 g32) and RTN (int8 per channel), then loaded in a fresh process by the engine and by plain
transformers. Refusals: a creation that cannot reach an index, recipes the runtime cannot honour.
"""
from __future__ import annotations

import json
import os
import time
from importlib import metadata
from pathlib import Path

import pytest
from clirun import engine, private_copy
from clirun import python_json as python
from conftest import SITE_AT_START, site_packages_listing

from engine.buildenv import READY, BuildEnv, BuildEnvFailed, envs_dir

try:
    metadata.version("compressed-tensors")
except metadata.PackageNotFoundError:
    pytest.skip("the transformers runtime is not installed (engine[transformers])", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "recipes" / "calibration" / "itrex-calib.txt"
LOCK = ROOT / "engine" / "runtimes" / "requirements" / "transformers-build.txt"


def write_recipe(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nsource:\n  synthetic: {{architecture: phi3, seed: 0}}\n{body}"
                    "target:\n  runtime: transformers\n")
    return path


GPTQ = """quantization:
  weight_dtype: int4
  scheme: asym
  group_size: 32
  algorithm: gptq
  calibration: {dataset: calib.txt, samples: 8, seq_len: 32}
"""
RTN = """quantization:
  weight_dtype: int8
  group_size: -1
  algorithm: rtn
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("transformers")
    (work / "calib.txt").write_text("\n".join(CALIBRATION.read_text().splitlines()[:8]) + "\n")
    recipes = [write_recipe(work, "tiny-gptq", GPTQ), write_recipe(work, "tiny-rtn8", RTN),
               write_recipe(work, "tiny-awq", GPTQ.replace("gptq", "awq").replace("asym", "sym"))]
    proc = engine("apply", *map(str, recipes), cwd=work)
    for name in ("tiny-gptq", "tiny-rtn8", "tiny-awq"):
        assert f"{name}@1: built" in proc.stdout, proc.stdout
    return work


def test_build_env_is_made_once_and_leaves_our_environment_alone(built):
    folders = [p for p in envs_dir(built / ".engine").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert [p.name.startswith("transformers-build-") for p in folders] == [True]
    record = json.loads((folders[0] / READY).read_text())
    assert record["lock"] == BuildEnv("x", LOCK).lock() and record["bytes"] < 1.5e9  # MBs, not a second torch
    frozen = python(f"""
        import json, subprocess, sys
        out = subprocess.run([{str(folders[0] / 'bin' / 'python')!r}, "-c",
            "import json, torch, transformers, llmcompressor; print(json.dumps([torch.__file__, transformers.__version__]))"],
            capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])
    """, built)
    assert frozen[0].startswith(str(Path(os.__file__).parent.parent)) or "/site-packages/torch/" in frozen[0]
    assert not frozen[0].startswith(str(folders[0])), "torch must come from the engine's environment"
    assert frozen[1] == BuildEnv("x", LOCK).lock()["transformers"]
    started = time.perf_counter()  # reused: no pip, no venv
    assert BuildEnv("transformers-build", LOCK).ensure(envs_dir(built / ".engine")) == folders[0] / "bin" / "python"
    assert time.perf_counter() - started < 1
    assert site_packages_listing() == SITE_AT_START, "creating the build environment changed the engine's own"


def test_gptq_variant_loads_in_a_fresh_process_with_the_engine_and_with_plain_transformers(built):
    out = python("""
        import json, numpy as np, engine
        from transformers import AutoModelForCausalLM, AutoTokenizer
        m = engine.load("tiny-gptq")
        text = m.generate("The history of", max_new_tokens=8)
        logits = m.logits(m.encode("The history of the city"))
        folder = m.info.artifact_dir
        config = json.load(open(folder + "/config.json"))
        plain = AutoModelForCausalLM.from_pretrained(folder)
        tok = AutoTokenizer.from_pretrained(folder)
        ids = tok("The history of", return_tensors="pt")
        new = plain.generate(**ids, max_new_tokens=4, do_sample=False)[0].shape[0] - ids["input_ids"].shape[1]
        print(json.dumps({"tokens": text.new_tokens, "shape": list(logits.shape),
                          "finite": bool(np.isfinite(logits).all()), "qc": config["quantization_config"],
                          "plain_new": int(new), "type": type(m).__name__}))
    """, built)
    assert out["tokens"] >= 1 and out["finite"] and out["shape"][0] > 1 and out["type"] == "TransformersHFModel"
    qc = out["qc"]
    weights = qc["config_groups"]["group_0"]["weights"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert (weights["num_bits"], weights["group_size"], weights["strategy"], weights["symmetric"]) == (4, 32, "group",
                                                                                                        False)
    assert "lm_head" in qc["ignore"] and out["plain_new"] >= 1


def test_show_and_ls_tell_what_was_built(built):
    shown = engine("show", "tiny-gptq", cwd=built).stdout
    assert "GPTQModifier" in shown and "pack-quantized" in shown and "int4 g32" in shown
    rtn = engine("show", "tiny-rtn8", "--json", cwd=built).stdout
    meta = json.loads(rtn)
    assert "QuantizationModifier" in rtn and '"strategy": "channel"' in rtn, meta.keys()
    awq = engine("show", "tiny-awq", cwd=built).stdout  # llm-compressor's AWQ runs on a CPU-only machine
    assert "AWQ" in awq and "int4 g32" in awq


def test_a_second_apply_rebuilds_nothing(built):
    proc = engine("apply", str(built / "tiny-gptq.yaml"), cwd=built)
    assert "building" not in proc.stdout and "creating the build environment" not in proc.stdout, proc.stdout


def test_the_lock_is_in_the_build_key(tmp_path, monkeypatch):
    from engine.discovery import get_runtime
    from engine.plan import make_plan
    from engine.recipe import load_recipes
    from engine.store import Store

    recipe = load_recipes(write_recipe(tmp_path, "k", RTN))[0][0]
    before = make_plan(recipe, Store(tmp_path / "store")).build.key
    changed = tmp_path / "lock.txt"
    changed.write_text(LOCK.read_text().replace("loguru==0.7.3", "loguru==0.7.2"))
    monkeypatch.setattr(get_runtime("transformers"), "build_env", BuildEnv("transformers-build", changed))
    assert make_plan(recipe, Store(tmp_path / "store")).build.key != before


def test_a_build_env_that_cannot_be_created_says_which_requirement_and_leaves_nothing(tmp_path, monkeypatch):
    (tmp_path / "wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: no index, an empty folder of wheels
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "wheels"))
    lock = tmp_path / "lock.txt"
    lock.write_text("engine-no-such-distribution==0.0.1\n")
    with pytest.raises(BuildEnvFailed) as caught:
        BuildEnv("broken", lock).ensure(tmp_path / "envs")
    assert "pip could not install engine-no-such-distribution==0.0.1" in caught.value.message
    assert "PIP_INDEX_URL" in caught.value.hint
    assert not [p for p in (tmp_path / "envs").iterdir() if p.is_dir()], "a failed creation left a folder"


def test_offline_creation_through_the_cli_registers_nothing(tmp_path):
    (tmp_path / "wheels").mkdir()
    recipe = write_recipe(tmp_path, "offline", RTN)
    proc = engine("apply", str(recipe), cwd=tmp_path, check=1,
                  env={"ENGINE_ENVS": str(tmp_path / "envs"), "PIP_NO_INDEX": "1",
                       "PIP_FIND_LINKS": str(tmp_path / "wheels")})
    assert "cannot create the build environment: pip could not install" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "offline" not in engine("ls", cwd=tmp_path).stdout.replace(str(tmp_path), "")


@pytest.mark.parametrize("body, words", [
    ("quantization: {weight_dtype: int4, algorithm: gptq}\n", "quantization.calibration is required"),
    ("quantization: {weight_dtype: nf4, algorithm: rtn}\n", "int4 or int8"),
    ("quantization: {weight_dtype: int4, algorithm: rtn, compute_dtype: int8}\n", "compute_dtype"),
    ("quantization: {weight_dtype: int4, algorithm: teq}\n", "algorithm"),
])
def test_recipes_the_runtime_cannot_honour_are_refused(tmp_path, body, words):
    recipe = write_recipe(tmp_path, "bad", body)
    proc = engine("validate", str(recipe), cwd=tmp_path, check=None)
    assert proc.returncode != 0 and words in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


# -- a registered variant as the source of another recipe ------------------------------------------------
def _ort_present() -> None:
    try:
        metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError:
        pytest.skip("the chain builds with onnxruntime-genai (engine[ortgenai])")


def write_child(folder: Path, name: str, source: str, runtime: str = "onnxruntime-genai") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\nsource: {source}\nquantization: {{weight_dtype: int4, group_size: 32, "
                    f"scheme: asym}}\ntarget: {{runtime: {runtime}}}\n")
    return path


@pytest.fixture(scope="module")
def chained(built, tmp_path_factory) -> Path:
    """tiny-gptq (transformers) -> tiny-chain (onnxruntime-genai int4, from the dequantized checkpoint)."""
    _ort_present()
    work = private_copy(built, tmp_path_factory.mktemp("chain"))
    engine("apply", str(write_child(work, "tiny-chain", "{variant: tiny-gptq@1, dequantize: true}")), cwd=work)
    return work


def test_a_variant_is_the_source_of_an_onnxruntime_genai_build_that_loads_and_runs(chained):
    out = python("""
        import json, numpy as np, engine
        m = engine.load("tiny-chain")
        text = m.generate("The history of", max_new_tokens=4)
        print(json.dumps({"tokens": text.new_tokens, "finite": bool(np.isfinite(m.logits(m.encode("The city"))).all()),
                          "source": m.info.source_kind}))
    """, chained)
    assert out == {"tokens": out["tokens"], "finite": True, "source": "variant"} and out["tokens"] >= 1
    shown = engine("show", "tiny-chain", cwd=chained).stdout
    assert "tiny-chain@1 <- tiny-gptq@1 <- synthetic" in shown, shown


def test_the_source_key_is_the_parents_artifact_key(chained):
    from engine.paths import resolve
    from engine.plan import make_plan
    from engine.recipe import load_recipes
    from engine.registry import Registry
    from engine.store import Store
    from engine.variant_source import using_locations

    locations = resolve(chained / "registry.db")
    parent = Registry(locations.registry, readonly=True).get("tiny-gptq")
    recipe = load_recipes(write_child(chained, "k", "{variant: tiny-gptq}", runtime="transformers"))[0][0]
    with pytest.raises(Exception, match="already quantized"):
        with using_locations(locations):
            make_plan(recipe, Store(locations.store))
    recipe = load_recipes(write_child(chained, "k2", "{variant: tiny-gptq}"))[0][0]
    with using_locations(locations), pytest.raises(Exception, match="would quantize its weights again"):
        make_plan(recipe, Store(locations.store))
    from engine.variant_source import VariantSource

    with using_locations(locations):
        source = VariantSource({"variant": "tiny-gptq"}, chained)
        assert source.store_key(source.identity(None)) == parent.artifact_key


def test_rm_of_a_parent_needs_force_and_names_its_children(chained, tmp_path):
    work = private_copy(chained, tmp_path)
    proc = engine("rm", "tiny-gptq", cwd=work, check=1)
    assert "tiny-gptq is the source of tiny-chain@1" in proc.stderr and "--force" in proc.stderr
    engine("rm", "--force", "tiny-gptq", cwd=work)
    assert "tiny-gptq@1 (removed)" in engine("show", "tiny-chain", cwd=work).stdout


@pytest.mark.parametrize("name, source, words", [
    ("q", "{variant: tiny-gptq}", "the source is already quantized: compressed-tensors"),
    ("typo", "{variant: tiny-gptk}", "did you mean 'tiny-gptq'"),
    ("tiny-gptq", "{variant: tiny-gptq, dequantize: true}", "a cycle: tiny-gptq -> tiny-gptq@1"),
    ("of-ort", "{variant: tiny-chain}", "not a Hugging Face checkpoint"),
    ("deq-float", "{synthetic: {seed: 1}, dequantize: true}", "dequantize applies to `source.variant` only"),
])
def test_bad_variant_sources_are_refused_and_nothing_is_registered(chained, tmp_path, name, source, words):
    work = private_copy(chained, tmp_path)
    before = engine("ls", "--json", cwd=work).stdout
    proc = engine("apply", str(write_child(work, name, source)), cwd=work, check=None)
    assert proc.returncode != 0 and words in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and engine("ls", "--json", cwd=work).stdout == before


def test_a_quantized_checkpoint_folder_as_source_is_refused_naming_its_format(built, tmp_path):
    from engine.registry import Registry

    key = Registry(built / "registry.db", readonly=True).get("tiny-gptq").artifact_key
    folder = built / ".engine" / "artifacts" / key / "files"
    proc = engine("apply", str(write_child(tmp_path, "from-folder", f"{{path: {folder}}}", runtime="openvino")),
                  cwd=tmp_path, check=3)
    assert "source: the source is already quantized: compressed-tensors (llm-compressor, format pack-quantized), " \
           "int4 g32; runtime openvino would quantize its weights again" in proc.stderr, proc.stderr
    assert not (tmp_path / "registry.db").exists() or "from-folder" not in engine("ls", cwd=tmp_path).stdout
