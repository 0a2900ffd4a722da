"""Runtime `openvino` end to end: the real CLI (subprocesses), real optimum-intel export, real NNCF
compression, real OpenVINO load and generate in fresh processes, on tiny seeded models.

Each build costs ~25 s (a child process importing optimum/transformers), so builds are shared
between tests through module-scoped fixtures and combined where a test only reads.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from clirun import engine

from engine.recipe import load_recipe, load_recipes

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def _has(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


needs_openvino = pytest.mark.skipif(not all(_has(m) for m in ("openvino", "optimum.intel", "nncf")),
                                    reason="the openvino runtime is not installed (engine[openvino])")

TINY = """\
name: {name}
description: {description}
source:
  synthetic: {{architecture: phi3, seed: 0}}
quantization:
{quantization}
target:
  runtime: openvino
  device: cpu
  options:
{options}
"""


def write(folder: Path, name: str, quantization: str, options: str = "{}", description: str = "tiny") -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(TINY.format(name=name, description=description,
                                quantization=textwrap.indent(textwrap.dedent(quantization).strip(), "  "),
                                options=textwrap.indent(textwrap.dedent(options).strip(), "    ")))
    return path




def python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def show(name: str, cwd: Path) -> dict:
    return json.loads(engine("show", name, "--json", cwd=cwd).stdout)


def manifest(work: Path, name: str) -> dict:
    return json.loads((work / ".engine" / "artifacts" / show(name, work)["artifact_key"] / "manifest.json").read_text())


def result(proc: subprocess.CompletedProcess) -> dict:
    """The JSON line a probe printed after 'RESULT '."""
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


INT8 = ("weight_dtype: int8\nscheme: sym\ngroup_size: -1",
        "ov_config: {KV_CACHE_PRECISION: f16, NUM_STREAMS: 1}")
INT4 = ("weight_dtype: int4\nscheme: asym\ngroup_size: 32\nskip_modules: [lm_head]",
        'ov_config: {KV_CACHE_PRECISION: f32, DYNAMIC_QUANTIZATION_GROUP_SIZE: "64"}')


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A work folder where tiny int8 and int4 RTN variants were applied once, in one command."""
    work = tmp_path_factory.mktemp("ov")
    write(work, "tiny-int8", *INT8)
    write(work, "tiny-int4", *INT4)
    out = engine("apply", "tiny-int8.yaml", "tiny-int4.yaml", cwd=work).stdout
    assert "tiny-int8@1: built" in out and "tiny-int4@1: built" in out, out
    return work


@pytest.fixture(scope="module")
def loaded(built) -> dict:
    """Both variants loaded by name in one fresh process: ov_config read back, text generated."""
    proc = python("""
        import json, engine
        from engine.errors import RecipeInvalid
        from engine.runtime import Sampling
        out = {}
        for name in ("tiny-int8", "tiny-int4"):
            m = engine.load(name)
            out[name] = {
                "ov_config": m.ov_config, "native": type(m.native).__module__,
                "raw_kv": m.native.request.get_compiled_model().get_property("KV_CACHE_PRECISION").to_string(),
                "text": m.generate("Hello", max_new_tokens=8),
                "greedy": [m.generate("Hi", max_new_tokens=6) for _ in range(2)],
                "batch": m.generate_ids([m.encode("Hi"), m.encode("Hello there")], Sampling(max_new_tokens=5)),
            }
        out["override"] = engine.load("tiny-int4", ov_config={"KV_CACHE_PRECISION": "u8"}).ov_config
        try:
            engine.load("tiny-int4", ov_config={"KV_CACHE_PRECISON": "u8"})
        except RecipeInvalid as e:
            out["refused"] = e.message
        print("RESULT " + json.dumps(out))
    """, built)
    return result(proc)


@needs_openvino
def test_build_registers_ir_with_hashes_and_versions(built):
    for name, dtype, bits in (("tiny-int8", "int8", 8), ("tiny-int4", "int4", 4)):
        doc = show(name, built)
        assert (doc["runtime"], doc["weight_dtype"], doc["version"]) == ("openvino", dtype, 1)
        files = {f["path"]: f for f in doc["files"]}
        assert {"openvino_model.xml", "openvino_model.bin", "tokenizer.json", "config.json",
                "openvino_tokenizer.xml", "openvino_detokenizer.xml"} <= set(files)
        assert all(len(f["sha256"]) == 64 for f in files.values())
        build = doc["steps"][-1]
        assert {"optimum-intel", "optimum", "openvino", "openvino-tokenizers", "nncf", "transformers",
                "torch"} <= set(build["versions"])
        assert build["params"]["config"]["bits"] == bits and "ov_config" not in json.dumps(build["params"])
    int4 = show("tiny-int4", built)["steps"][-1]["params"]["config"]
    assert int4 == {"bits": 4, "dtype": "int4", "sym": False, "group_size": 32, "ratio": 1.0,
                    "backup_precision": "int8_asym", "all_layers": False, "quant_method": "default",
                    "scale_estimation": False, "gptq": False, "group_size_fallback": "error",
                    "ignored_scope": {"patterns": [r"__module\.lm_head(\.|/)"], "validate": True}}
    # the IR really holds 4-bit weights for int4 and only 8-bit ones for int8 (bytes per element type)
    weights = {n: manifest(built, n)["meta"]["openvino_build"]["weight_bytes"] for n in ("tiny-int8", "tiny-int4")}
    assert weights["tiny-int8"]["i8"] > 0 and not {"u4", "i4"} & set(weights["tiny-int8"])
    assert weights["tiny-int4"]["u4"] > 0
    log = next((built / ".engine" / "artifacts" / show("tiny-int4", built)["artifact_key"] / "logs").glob("*.log"))
    assert "int4_asym, group size 32" in log.read_text() and "1 ignored nodes were found" in log.read_text()


@needs_openvino
def test_reapply_is_a_noop(built):
    out = engine("apply", "tiny-int8.yaml", "tiny-int4.yaml", cwd=built).stdout
    assert "tiny-int8@1: up to date, nothing rebuilt" in out and "tiny-int4@1: up to date, nothing rebuilt" in out
    assert engine("verify", cwd=built).returncode == 0


@needs_openvino
def test_load_in_fresh_process_with_ov_config_in_effect(built, loaded):
    assert loaded["tiny-int8"]["ov_config"]["KV_CACHE_PRECISION"] == "f16" == loaded["tiny-int8"]["raw_kv"]
    assert loaded["tiny-int8"]["ov_config"]["NUM_STREAMS"] == "1"
    # compute_dtype fp32 (the default) turns dynamic activation quantization off unless ov_config says otherwise
    assert loaded["tiny-int8"]["ov_config"]["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == "0"
    assert loaded["tiny-int4"]["ov_config"]["KV_CACHE_PRECISION"] == "f32"
    assert loaded["tiny-int4"]["ov_config"]["DYNAMIC_QUANTIZATION_GROUP_SIZE"] == "64"
    assert loaded["override"]["KV_CACHE_PRECISION"] == "u8"
    assert "did you mean 'KV_CACHE_PRECISION'" in loaded["refused"]
    for name in ("tiny-int8", "tiny-int4"):
        got = loaded[name]
        assert got["native"].startswith("optimum.intel") and isinstance(got["text"], str) and got["text"]
        assert got["greedy"][0] == got["greedy"][1]  # greedy is deterministic
        assert len(got["batch"]) == 2 and all(0 < len(b) <= 5 for b in got["batch"])
    # recorded where users look: the recipe stored in the registry
    doc = show("tiny-int4", built)
    assert doc["recipe"]["target"]["options"]["ov_config"] == {"KV_CACHE_PRECISION": "f32",
                                                               "DYNAMIC_QUANTIZATION_GROUP_SIZE": "64"}


@needs_openvino
def test_ov_config_change_does_not_rebuild(built, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(built, work)
    before = show("tiny-int4", work)
    write(work, "tiny-int4", INT4[0], "ov_config: {KV_CACHE_PRECISION: u8, PERFORMANCE_HINT: THROUGHPUT}")
    assert "build   cached" in engine("apply", "--dry-run", "tiny-int4.yaml", cwd=work).stdout
    out = engine("apply", "tiny-int4.yaml", cwd=work).stdout
    assert "nothing rebuilt" in out and "built" not in out.replace("rebuilt", "")
    assert show("tiny-int4", work)["artifact_key"] == before["artifact_key"]


@needs_openvino
def test_ov_config_change_is_a_new_version_of_the_same_artifact(built, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(built, work)
    before = show("tiny-int4", work)
    write(work, "tiny-int4", INT4[0], "ov_config: {KV_CACHE_PRECISION: u8}")
    out = engine("apply", "tiny-int4.yaml", cwd=work).stdout
    assert "nothing rebuilt" in out
    after = show("tiny-int4", work)
    assert after["version"] == before["version"] + 1 and after["artifact_key"] == before["artifact_key"]
    assert after["recipe"]["target"]["options"]["ov_config"] == {"KV_CACHE_PRECISION": "u8"}


AWQ = """\
weight_dtype: int4
scheme: asym
group_size: 128
algorithm: awq
calibration: {dataset: calib.txt, samples: 16, seq_len: 32}
"""
AWQ_OPTIONS = "group_size_fallback: adjust\nscale_estimation: true"
CALIBRATION = "\n".join(f"Sentence number {i} of a small calibration text about rivers, bread and trains."
                        for i in range(24)) + "\n"


@needs_openvino
def test_calibration_content_changes_the_key_description_and_path_do_not(built, tmp_path):
    """Data-aware AWQ + scale estimation with group 128 on 64-wide layers, handled by fallback adjust."""
    shutil.copytree(built, tmp_path, dirs_exist_ok=True)  # reuse the synthetic source already made
    (tmp_path / "calib.txt").write_text(CALIBRATION)
    write(tmp_path, "tiny-awq", AWQ, AWQ_OPTIONS)
    out = engine("apply", "tiny-awq.yaml", cwd=tmp_path).stdout
    assert "tiny-awq@1: built" in out
    doc = show("tiny-awq", tmp_path)
    params = doc["steps"][-1]["params"]
    assert params["config"]["quant_method"] == "awq" and params["config"]["scale_estimation"] is True
    assert params["calibration"]["samples"] == 16 and len(params["calibration"]["sha256"]) == 64
    assert "calib.txt" not in json.dumps(params)  # the content hash is in the key, the path is not
    log = next((tmp_path / ".engine" / "artifacts" / doc["artifact_key"] / "logs").glob("*.log")).read_text()
    assert "Applying data-aware AWQ" in log and "Applying Scale Estimation" in log
    assert "group size 64" in log  # adjusted from 128 for the 64-wide layers
    # description: no rebuild
    write(tmp_path, "tiny-awq", AWQ, AWQ_OPTIONS, description="new words")
    assert "tiny-awq@1: up to date, nothing rebuilt" in engine("apply", "tiny-awq.yaml", cwd=tmp_path).stdout
    # same content under another path: no rebuild
    (tmp_path / "data").mkdir()
    shutil.move(tmp_path / "calib.txt", tmp_path / "data" / "moved.txt")
    write(tmp_path, "tiny-awq", AWQ.replace("calib.txt", "data/moved.txt"), AWQ_OPTIONS, description="new words")
    assert "tiny-awq@1: up to date, nothing rebuilt" in engine("apply", "tiny-awq.yaml", cwd=tmp_path).stdout
    # one line of the data changed: a new build key, so apply would rebuild (the plan says so; a
    # second real AWQ build would only add ~30 s of the same code path)
    plan = engine("apply", "--dry-run", "tiny-awq.yaml", cwd=tmp_path).stdout
    assert "source  cached" in plan and "build   cached" in plan
    (tmp_path / "data" / "moved.txt").write_text(CALIBRATION.replace("number 3 ", "number three "))
    plan = engine("apply", "--dry-run", "tiny-awq.yaml", cwd=tmp_path).stdout
    assert "source  cached" in plan and "build   to build" in plan
    assert doc["artifact_key"][:16] not in plan.split("build", 1)[1]


BAD = {
    "bad-ov-key": ("weight_dtype: int4", "ov_config: {KV_CACHE_PRECISON: u8}",
                   "target.options.ov_config.KV_CACHE_PRECISON", "did you mean 'KV_CACHE_PRECISION'"),
    "bad-fp4": ("weight_dtype: fp4_e2m1", "{}", "quantization.weight_dtype", "supported: int8, int4"),
    "bad-ratio": ("weight_dtype: int4", "ratio: 1.5", "target.options.ratio", "more than the maximum 1"),
    "bad-perf-hint": ("weight_dtype: int4", "ov_config: {PERFORMANCE_HINT: FAST}",
                      "target.options.ov_config.PERFORMANCE_HINT", "LATENCY, THROUGHPUT"),
    "bad-int8-group": ("weight_dtype: int8", "{}", "quantization.group_size", "per output channel only"),
    "bad-awq-no-data": ("weight_dtype: int4\nalgorithm: awq", "{}", "quantization", "needs quantization.calibration"),
    "bad-mxfp4-group": ("weight_dtype: mxfp4\ngroup_size: 64", "{}", "quantization.group_size", "group_size 32 only"),
    "bad-teq": ("weight_dtype: int4\nalgorithm: teq", "{}", "quantization.algorithm", "supported: rtn, awq, gptq"),
    "bad-unused-data": ("weight_dtype: int4\ncalibration: {dataset: [some text here]}", "{}",
                        "quantization.calibration", "no effect"),
    "bad-option": ("weight_dtype: int4", "ratoi: 0.5", "target.options.ratoi", "did you mean 'ratio'"),
}


def test_bad_options_refused_at_validation_without_traceback(tmp_path):
    files = [write(tmp_path, name, q, o) for name, (q, o, _, _) in BAD.items()]
    proc = engine("validate", *map(str, files), cwd=tmp_path, check=3)
    assert "Traceback" not in proc.stderr and f"{len(BAD)} of {len(BAD)} recipe(s) invalid" in proc.stderr
    blocks = proc.stderr.split(str(tmp_path))
    for name, (_, _, path, message) in BAD.items():
        mine = "".join(b for b in blocks if b.startswith(f"/{name}.yaml:"))
        assert f" {path}: " in mine and message in mine, (name, mine)
    # apply refuses too, before any work
    proc = engine("apply", str(files[0]), cwd=tmp_path, check=3)
    assert "Traceback" not in proc.stderr and not (tmp_path / ".engine").exists()


def test_group_size_not_dividing_a_layer_is_refused_before_work(tmp_path):
    recipe = write(tmp_path, "tiny-g128", "weight_dtype: int4\ngroup_size: 128")
    proc = engine("apply", str(recipe), cwd=tmp_path, check=3)
    err = proc.stderr
    assert "quantization.group_size: 128 does not divide" in err and "Traceback" not in err
    assert "model.layers.*.self_attn.qkv_proj (input width 64, 2 layers)" in err
    assert "mlp.down_proj" not in err  # 128 divides the 128-wide down projection
    assert "group_size_fallback: adjust" in err
    assert not (tmp_path / ".engine" / "artifacts").exists()  # not even the source was made


@needs_openvino
def test_skip_module_that_matches_nothing_is_refused_before_export(built, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(built, work)
    recipe = write(work, "tiny-skip", "weight_dtype: int4\nskip_modules: [lm_head, model.layers.9.mlp]")
    proc = engine("apply", str(recipe), cwd=work, check=3)
    assert "no module of this model is named 'model.layers.9.mlp'" in proc.stderr
    assert "model.layers.0.mlp.down_proj" in proc.stderr and "Traceback" not in proc.stderr


def test_build_params_key_ignores_load_time_settings(tmp_path):
    from engine.runtimes.openvino import OpenVINORuntime
    from engine.sources import source_from_recipe

    def params(options: str, quantization: str = INT4[0]) -> dict:
        recipe = load_recipe(write(tmp_path, "k", quantization, options))
        source = source_from_recipe(recipe.data["source"], recipe.base_dir())
        p = OpenVINORuntime().build_params(recipe.data, recipe.base_dir(), source)
        return {k: v for k, v in p.items() if not k.startswith("_")}

    base = params("{}")
    assert params("ov_config: {KV_CACHE_PRECISION: u8, NUM_STREAMS: 2}") == base
    assert params("{}", INT4[0] + "\ncompute_dtype: bf16") == base
    assert params("ratio: 1") == base and params("backup_precision: int8_asym") == base
    assert params("ratio: 0.8") != base and params("convert_tokenizer: false") != base
    assert params("{}", INT4[0].replace("asym", "sym"))["config"]["sym"] is True
    assert params("{}", INT4[0].replace("int4", "int4_clip")) == base  # an alias, one key


def test_every_recipe_in_recipes_folder_is_valid():
    files = sorted(RECIPES.glob("*.yaml"))
    assert len([f for f in files if "-ov" in f.stem]) >= 4
    for path in files:  # raises RecipeInvalid, naming file and field, if one went stale (sweeps expand)
        assert all(recipe.name for recipe in load_recipes(path)[0])
    awq = load_recipe(RECIPES / "phi35-int4-ov-awq.yaml").data
    calibration = RECIPES / awq["quantization"]["calibration"]["dataset"]
    assert len([line for line in calibration.read_text().splitlines() if line.strip()]) >= 60


@needs_openvino
def test_trained_fixture_int8_int4_awq_and_two_runtimes(tmp_path):
    fixture = ROOT / "models" / "wt2-phi3-7m"  # both ship with the repository
    wiki = ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"
    lines = [line.strip() for line in wiki.read_text(encoding="utf-8").splitlines()
             if len(line.strip()) > 80 and not line.strip().startswith("=")][:32]
    (tmp_path / "calib.txt").write_text("\n".join(lines) + "\n")
    recipes = {
        "wt2-int8": ("weight_dtype: int8\nscheme: asym\ngroup_size: -1", "{}"),
        "wt2-awq": ("weight_dtype: int4\nscheme: asym\ngroup_size: 32\nalgorithm: awq\n"
                    "calibration: {dataset: calib.txt, samples: 32, seq_len: 128}",
                    "scale_estimation: true\nov_config: {KV_CACHE_PRECISION: f16}"),
    }
    for name, (quantization, options) in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(
            f"name: {name}\nsource: {{path: {fixture}}}\nquantization:\n{textwrap.indent(quantization, '  ')}\n"
            f"target:\n  runtime: openvino\n  options:\n{textwrap.indent(options, '    ')}\n")
    # one recipe, two runtimes (only `name` and `target.runtime` differ): wt2-ov is the int4 RTN variant
    same = "source: {{path: {f}}}\nquantization: {{weight_dtype: int4, group_size: 32}}\ntarget: {{runtime: {r}}}\n"
    (tmp_path / "wt2-ov.yaml").write_text("name: wt2-ov\n" + same.format(f=fixture, r="openvino"))
    (tmp_path / "wt2-ort.yaml").write_text("name: wt2-ort\n" + same.format(f=fixture, r="onnxruntime-genai"))
    names = ["wt2-int8", "wt2-ov", "wt2-awq"] + (["wt2-ort"] if _has("onnxruntime_genai") else [])
    out = engine("apply", *[f"{n}.yaml" for n in names], cwd=tmp_path).stdout
    assert all(f"{n}@1: built" in out for n in names), out
    again = engine("apply", *[f"{n}.yaml" for n in names], cwd=tmp_path).stdout
    assert all(f"{n}@1: up to date, nothing rebuilt" in again for n in names), again
    sizes = {n: show(n, tmp_path)["size_bytes"] for n in ("wt2-int8", "wt2-ov", "wt2-awq")}
    assert sizes["wt2-int8"] > 1.2 * sizes["wt2-ov"] and sizes["wt2-int8"] > 1.2 * sizes["wt2-awq"], sizes
    # AWQ + scale estimation changes the int4 values and scales: other bytes than plain int4
    bins = {n: next(f["sha256"] for f in show(n, tmp_path)["files"] if f["path"] == "openvino_model.bin")
            for n in ("wt2-ov", "wt2-awq")}
    assert bins["wt2-ov"] != bins["wt2-awq"]
    proc = python(f"""
        import json, engine
        out = {{n: engine.load(n).generate("The history of the", max_new_tokens=16) for n in {names!r}}}
        out["kv"] = engine.load("wt2-awq").ov_config["KV_CACHE_PRECISION"]
        print("RESULT " + json.dumps(out))
    """, tmp_path)
    texts = result(proc)
    assert texts.pop("kv") == "f16"
    for name, text in texts.items():
        assert len(text.strip()) > 10, (name, text)  # a trained model continues with real words
    rows = {r["name"]: r for r in json.loads(engine("ls", "--json", cwd=tmp_path).stdout)}
    if "wt2-ort" in rows:
        assert (rows["wt2-ort"]["runtime"], rows["wt2-ov"]["runtime"]) == ("onnxruntime-genai", "openvino")
        assert rows["wt2-ort"]["artifact_key"] != rows["wt2-ov"]["artifact_key"]
        human = engine("ls", cwd=tmp_path).stdout
        assert "onnxruntime-genai" in human and "openvino" in human



@needs_openvino
def test_gpu_refused_cleanly_where_openvino_sees_none(tmp_path):
    import openvino as ov

    if any(d.startswith("GPU") for d in ov.Core().available_devices):
        pytest.skip("this machine has an OpenVINO GPU")
    recipe = write(tmp_path, "tiny-gpu", "weight_dtype: int4")
    recipe.write_text(recipe.read_text().replace("device: cpu", "device: gpu"))
    proc = engine("apply", str(recipe), cwd=tmp_path, check=1)
    assert "OpenVINO sees no GPU" in proc.stderr and "device: cpu" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / ".engine" / "artifacts").exists()
