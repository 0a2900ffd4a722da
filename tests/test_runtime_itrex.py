"""Runtime `itrex`: the ITREX vocabulary on Intel Neural Compressor 3.x, through the real CLI.

Real quantization of a tiny seeded Phi-3 with every weight_dtype (RTN) and with AWQ, TEQ and GPTQ,
reloaded in one fresh process; validation refusals; cache behaviour. Builds are shared where tests
only read (each build is a child process that pays ~10 s of imports).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from clirun import engine, private_copy
from clirun import python_json as python

try:
    metadata.version("neural-compressor-pt")
except metadata.PackageNotFoundError:
    pytest.skip("the itrex runtime is not installed (engine[itrex])", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
CALIBRATION = ROOT / "recipes" / "calibration" / "itrex-calib.txt"
HEAVY = ("torch", "transformers", "neural_compressor", "numpy.linalg")

#: name -> (weight_dtype, algorithm, scheme)
VARIANTS = {
    "rtn-int8": ("int8", "rtn", "sym"),
    "rtn-int4clip": ("int4_clip", "rtn", "sym"),
    "rtn-int4fr": ("int4_fullrange", "rtn", "sym"),
    "rtn-nf4": ("nf4", "rtn", "sym"),
    "rtn-fp4": ("fp4_e2m1", "rtn", "sym"),
    "awq-int4": ("int4_clip", "awq", "asym"),
    "teq-int4": ("int4_clip", "teq", "sym"),
    "gptq-int4": ("int4_clip", "gptq", "sym"),
}
#: Linear weights the tiny Phi-3 quantizes (2 blocks x (qkv 64x192 + o 64x64 + gate_up 64x256 + down 128x64))
QUANTIZED_WEIGHTS = 2 * (64 * 192 + 64 * 64 + 64 * 256 + 128 * 64)


def write_recipe(folder: Path, name: str, dtype: str, algorithm: str = "rtn", scheme: str = "sym",
                 description: str = "tiny itrex test", skip: str = "[lm_head]") -> Path:
    scale = "fp32" if dtype in ("nf4", "fp4_e2m1") else "fp16"
    calibration = "\n  calibration: {dataset: calib.txt, samples: 8, seq_len: 32}" if algorithm != "rtn" else ""
    options = "\n  options: {teq_steps: 8, teq_seed: 0}" if algorithm == "teq" else ""
    path = folder / f"{name}.yaml"
    path.write_text(f"""\
name: {name}
description: {description}
source:
  synthetic: {{architecture: phi3, seed: 0}}
quantization:
  weight_dtype: {dtype}
  scale_dtype: {scale}
  scheme: {scheme}
  group_size: 32
  algorithm: {algorithm}
  skip_modules: {skip}{calibration}
target:
  runtime: itrex{options}
""")
    return path




def apply_side_by_side(groups: list[list[str]], cwd: Path) -> str:
    """`engine apply` for each group of recipes, the groups in parallel processes; their stdout."""
    procs = [subprocess.Popen([sys.executable, "-m", "engine", "apply", *group], cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for group in groups]
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err[-4000:]}"
    return "".join(out for out, _ in outs)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A work folder where every variant was applied (two CLI processes side by side)."""
    work = tmp_path_factory.mktemp("itrex")
    lines = CALIBRATION.read_text().splitlines()
    (work / "calib.txt").write_text("\n".join(lines[:12]) + "\n")
    paths = {name: write_recipe(work, name, *spec) for name, spec in VARIANTS.items()}
    stdout = apply_side_by_side([[str(p) for n, p in paths.items() if n.startswith("rtn")],
                                 [str(p) for n, p in paths.items() if not n.startswith("rtn")]], work)
    for name in VARIANTS:
        assert f"{name}@1: built" in stdout, stdout
    return work


@pytest.fixture
def work(built, tmp_path) -> Path:
    """A private copy of the module's folder, for tests that change or damage it."""
    return private_copy(built, tmp_path)


def test_every_variant_reloads_identically_and_generates_in_a_fresh_process(built):
    found = python(f"""
        import hashlib, json
        from pathlib import Path
        import torch
        from transformers import AutoModelForCausalLM
        import engine
        from engine.runtime import Sampling
        from engine.synthetic import make_synthetic_model

        make_synthetic_model({{"architecture": "phi3", "seed": 0}}, Path("src"))
        source = AutoModelForCausalLM.from_pretrained("src", dtype=torch.float32)
        greedy = Sampling(max_new_tokens=8)
        out = {{}}
        for name, dtype in {json.dumps({n: v[0] for n, v in VARIANTS.items()})}.items():
            m = engine.load(name)
            folder = Path(m.info.artifact_dir)
            record = json.loads((folder / "itrex.json").read_text())
            ids = torch.tensor([record["probe"]["ids"]])
            with torch.no_grad():
                q = m.native(ids).logits.float().contiguous()
                s = source(ids).logits.float()
            bits = 8 if dtype == "int8" else 4
            state = torch.load(folder / "quantized_weight.pt", weights_only=True)
            packed = [v for k, v in state.items() if k.endswith(".qweight")]
            codes = torch.cat([((v.reshape(-1) >> (bits * i)) & ((1 << bits) - 1)) for v in packed
                               for i in range(32 // bits)]).unique().tolist()
            prompts = [m.encode("Hello"), m.encode("A longer prompt, with more words in it")]
            out[name] = dict(
                identical=hashlib.sha256(q.numpy().tobytes()).hexdigest() == record["probe"]["logits_sha256"],
                diff=(q - s).abs().max().item(), codes=codes,
                unpacked=sum(v.numel() for v in packed) * (32 // bits),
                packed_dtypes=sorted({{str(v.dtype) for v in packed}}), scales=record["storage"]["scales"],
                size=(folder / "quantized_weight.pt").stat().st_size,
                batch=m.generate_ids(prompts, greedy), solo=[m.generate_ids([p], greedy)[0] for p in prompts],
                stream=[list(m.stream_ids(p, greedy)) for p in prompts], text=m.generate("Hello", 8))
        out["source_size"] = Path("src/model.safetensors").stat().st_size
        print(json.dumps(out))
    """, built)
    source_size = found.pop("source_size")
    for name, (dtype, _, scheme) in VARIANTS.items():
        got = found[name]
        assert got["identical"], f"{name}: reload in a fresh process changed the logits"
        assert got["diff"] > 0, f"{name}: logits equal the source's: nothing was quantized"
        assert got["unpacked"] == QUANTIZED_WEIGHTS and got["packed_dtypes"] == ["torch.int32"], name
        assert got["size"] < source_size, f"{name}: {got['size']} bytes is not smaller than the source"
        assert got["scales"] == (["float32"] if dtype in ("nf4", "fp4_e2m1") else ["float16"]), name
        assert got["batch"] == got["solo"] == got["stream"], f"{name}: batched/streamed greedy differ"
        assert all(len(row) == 8 for row in got["batch"]) and isinstance(got["text"], str)
    # the stored integer codes are the dtype's own range (sym codes are stored offset by 2**(bits-1))
    assert 16 < len(found["rtn-int8"]["codes"]) <= 255 and 0 not in found["rtn-int8"]["codes"]
    assert 0 not in found["rtn-int4clip"]["codes"] and len(found["rtn-int4clip"]["codes"]) == 15  # [-7, 7]
    assert 0 in found["rtn-int4fr"]["codes"]  # full range also uses -8
    assert all(len(found[n]["codes"]) >= 12 for n in ("rtn-nf4", "rtn-fp4", "awq-int4", "gptq-int4"))
    assert found["rtn-int8"]["diff"] < min(found[n]["diff"] for n in VARIANTS if n != "rtn-int8")
    assert found["rtn-int8"]["size"] > found["rtn-int4clip"]["size"]


def test_reapply_rebuilds_nothing_imports_nothing_heavy_and_records_the_mapping(built):
    probe = f"""
        import atexit, sys
        heavy = {HEAVY!r}
        atexit.register(lambda: print("HEAVY:", [m for m in heavy if m in sys.modules], file=sys.stderr))
        from engine.cli import main
        main(["apply", *{[f"{n}.yaml" for n in VARIANTS]!r}])
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(probe)], cwd=built, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for name in VARIANTS:
        assert f"{name}@1: up to date, nothing rebuilt" in proc.stdout
    assert "HEAVY: []" in proc.stderr
    rows = json.loads(engine("ls", "--json", cwd=built).stdout)
    assert sorted(r["name"] for r in rows) == sorted(VARIANTS) and {r["runtime"] for r in rows} == {"itrex"}
    doc = json.loads(engine("show", "awq-int4", "--json", cwd=built).stdout)
    meta = doc["build_meta"]
    assert meta["implementation"] == "neural-compressor-pt"
    assert meta["implementation_version"] == metadata.version("neural-compressor-pt")
    assert meta["inc_class"] == "AWQConfig" and "unpacks" in meta["note"]
    assert meta["inc_config"]["global"]["use_sym"] is False and meta["inc_config"]["global"]["bits"] == 4
    assert meta["inc_config"]["local"][".*lm_head"] == {"dtype": "fp32"}
    assert meta["layer_map"] == {"input_layernorm": ["self_attn.qkv_proj"],
                                 "post_attention_layernorm": ["mlp.gate_up_proj"]}
    assert ["scheme", "asym", "use_sym", False] in meta["mapping"]
    assert meta["itrex"]["weight_dtype"] == "int4_clip" and meta["calibration_samples"] == 8
    build = doc["steps"][-1]
    assert {"neural-compressor-pt", "torch", "transformers", "safetensors"} <= set(build["versions"])
    assert build["params"]["calibration"]["sha256"] and not any(k.startswith("_") for k in build["params"])
    shown = engine("show", "awq-int4", cwd=built).stdout  # people see the mapping; inc_config is in --json
    assert "ITREX settings -> Intel Neural Compressor" in shown and "use_sym" in shown and "neural-compressor-pt" in shown


def test_teq_is_deterministic_calibration_change_rebuilds_description_does_not(work):
    show = lambda name: json.loads(engine("show", name, "--json", cwd=work).stdout)  # noqa: E731
    weights = lambda name: next(f["sha256"] for f in show(name)["files"] if f["path"] == "quantized_weight.pt")  # noqa: E731
    trained = weights("teq-int4")
    engine("apply", "--force", "teq-int4.yaml", cwd=work)  # the same key, trained again from scratch
    assert weights("teq-int4") == trained
    first, first_weights = show("gptq-int4")["artifact_key"], weights("gptq-int4")
    write_recipe(work, "gptq-int4", "int4_clip", "gptq", description="a new description")
    assert "gptq-int4@1: up to date, nothing rebuilt" in engine("apply", "gptq-int4.yaml", cwd=work).stdout
    calib = work / "calib.txt"
    calib.write_text("A new first line of calibration text: the samples the build sees change.\n" + calib.read_text())
    assert "build   to build" in engine("apply", "--dry-run", "teq-int4.yaml", cwd=work).stdout
    assert "gptq-int4@2: built" in engine("apply", "gptq-int4.yaml", cwd=work).stdout
    assert show("gptq-int4")["artifact_key"] != first and weights("gptq-int4") != first_weights


def test_skip_module_matching_no_layer_fails_with_one_message(work):
    recipe = write_recipe(work, "bad-skip", "int8", skip="[lm_head, model.layers.7]")
    proc = engine("apply", str(recipe), cwd=work, check=1)
    assert "'model.layers.7' matches no Linear layer" in proc.stderr
    assert "model.layers.0.self_attn.qkv_proj" in proc.stderr  # the hint lists real layers
    assert "Traceback" not in proc.stderr
    assert "bad-skip" not in {r["name"] for r in json.loads(engine("ls", "--json", cwd=work).stdout)}


BAD = {
    "teq-nf4": ("weight_dtype: nf4\n  scale_dtype: fp32\n  algorithm: teq\n  calibration: {dataset: calib.txt}",
                "quantization.weight_dtype", "TEQ quantizes to int4 (clip) only"),
    "compute-bf16": ("weight_dtype: int8\n  scale_dtype: fp16\n  compute_dtype: bf16",
                     "quantization.compute_dtype", "computes in fp32"),
    "double-quant": ("weight_dtype: nf4\n  use_double_quant: true", "quantization.use_double_quant", "true"),
    "awq-no-calibration": ("weight_dtype: nf4\n  algorithm: awq", "quantization", "calibration is required"),
    "int4-fp32-scales": ("weight_dtype: int4\n  scale_dtype: fp32", "quantization.scale_dtype", "as fp16"),
    "nf4-asym": ("weight_dtype: nf4\n  scheme: asym", "quantization.scheme", "symmetric"),
    "gptq-fullrange": ("weight_dtype: int4_fullrange\n  scale_dtype: fp16\n  algorithm: gptq\n"
                       "  calibration: {dataset: calib.txt}", "quantization.weight_dtype", "no full-range switch"),
    "rtn-calibration": ("weight_dtype: int8\n  scale_dtype: fp16\n  calibration: {dataset: calib.txt}",
                        "quantization.calibration", "RTN is data-free"),
}


def test_unsupported_combinations_refused_at_validation(tmp_path):
    (tmp_path / "calib.txt").write_text("A line of calibration text long enough to count.\n")
    paths = []
    for name, (quant, _, _) in BAD.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"name: {name}\nsource: {{synthetic: {{architecture: phi3}}}}\n"
                        f"quantization:\n  {quant}\ntarget: {{runtime: itrex}}\n")
        paths.append(str(path))
    proc = engine("validate", *paths, cwd=tmp_path, check=3)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output
    for name, (_, where, message) in BAD.items():
        lines = [line for line in output.splitlines() if line.startswith(str(tmp_path / f"{name}.yaml") + ":")]
        assert any(f" {where}: " in line and message in line for line in lines), f"{name}:\n{output}"
    proc = engine("apply", str(tmp_path / "awq-no-calibration.yaml"), cwd=tmp_path, check=3)
    assert "calibration is required" in proc.stderr and "hint:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / ".engine").exists() and not (tmp_path / "registry.db").exists()


def test_mapping_table():
    from engine.runtimes.itrex import inc_settings

    def inc(dtype, algorithm="rtn", scheme="sym", mse=False):
        return inc_settings({"weight_dtype": dtype, "algorithm": algorithm, "scheme": scheme,
                             "group_size": -1, "mse_range": mse})

    assert inc("int8") == {"dtype": "int", "bits": 8, "use_sym": True, "group_size": -1, "use_full_range": False,
                           "use_mse_search": False, "use_layer_wise": False, "quant_lm_head": False}
    assert inc("int4")["bits"] == 4 and inc("int4") == inc("int4_clip")
    assert (inc("int4_fullrange")["use_full_range"], inc("int4_fullrange")["use_sym"]) == (True, True)
    assert inc("nf4")["dtype"] == "nf4" and inc("fp4_e2m1")["dtype"] == "fp4_e2m1"
    assert inc("int8", scheme="asym")["use_sym"] is False and inc("nf4", mse=True)["use_mse_search"] is True
    assert inc("int4", "awq") == {**inc("int4"), "use_auto_scale": True, "use_auto_clip": True, "folding": True}
    assert "use_mse_search" not in inc("int4", "teq") and inc("int4", "teq")["folding"] is True
    assert "use_full_range" not in inc("int4", "gptq")


def test_example_recipes_validate():
    from engine.discovery import get_runtime
    from engine.recipe import load_recipe
    from engine.sources import source_from_recipe

    runtime = get_runtime("itrex")
    recipes = sorted((ROOT / "recipes").glob("*itrex*.yaml"))
    algorithms = set()
    for path in recipes:
        recipe = load_recipe(path)
        source = source_from_recipe(recipe.data["source"], recipe.base_dir())
        params = runtime.build_params(recipe.data, recipe.base_dir(), source)  # resolves the calibration file too
        assert recipe.runtime == "itrex" and params["inc"]["quant_lm_head"] is False
        if path.name.startswith("phi35-"):
            algorithms.add(recipe.data["quantization"]["algorithm"])
    assert algorithms == {"rtn", "awq", "teq", "gptq"}
    wt2_rtn = {load_recipe(p).data["quantization"]["weight_dtype"]
               for p in recipes if p.name.startswith("wt2-phi3-") and "rtn" == load_recipe(p).data["quantization"]["algorithm"]}
    assert wt2_rtn == {"int8", "int4_clip", "int4_fullrange", "nf4", "fp4_e2m1"}
    assert len(CALIBRATION.read_text().splitlines()) >= 60


def test_trained_fixture_int8_stays_closest_to_the_source(tmp_path):
    fixture, wiki = ROOT / "models" / "wt2-phi3-7m", ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"
    awq = tmp_path / "wt2-awq.yaml"
    awq.write_text(f"""\
name: wt2-awq
source: {{path: {fixture}}}
quantization:
  weight_dtype: int4_clip
  scale_dtype: fp16
  algorithm: awq
  calibration: {{dataset: {CALIBRATION}, samples: 4, seq_len: 64}}
target: {{runtime: itrex}}
""")
    groups = [[str(ROOT / "recipes" / "wt2-phi3-int8-itrex.yaml"), str(ROOT / "recipes" / "wt2-phi3-nf4-itrex.yaml")],
              [str(awq)]]
    apply_side_by_side(groups, tmp_path)
    recipes = groups[0] + groups[1]
    assert engine("apply", *recipes, cwd=tmp_path).stdout.count("up to date, nothing rebuilt") == 3
    found = python(f"""
        import json
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import engine

        tok = AutoTokenizer.from_pretrained({str(fixture)!r})
        source = AutoModelForCausalLM.from_pretrained({str(fixture)!r}, dtype=torch.float32)
        ids = tok(open({str(wiki)!r}, encoding="utf-8").read()[:40000])["input_ids"]
        windows = torch.tensor([ids[i:i + 128] for i in range(0, 4 * 1000, 1000)])
        with torch.no_grad():
            reference = torch.log_softmax(source(windows).logits.float(), -1)
        out = {{}}
        for name in ("wt2-phi3-int8-itrex", "wt2-phi3-nf4-itrex", "wt2-awq"):
            m = engine.load(name)
            with torch.no_grad():
                logp = torch.log_softmax(m.native(windows).logits.float(), -1)
            kl = (reference.exp() * (reference - logp)).sum(-1).mean().item()
            out[name] = {{"kl": kl, "text": m.generate("The history of the", max_new_tokens=16)}}
        print(json.dumps(out))
    """, tmp_path)
    kl = {name: v["kl"] for name, v in found.items()}
    assert all(0 < v < 1 for v in kl.values()), kl
    assert kl["wt2-phi3-int8-itrex"] < min(kl["wt2-phi3-nf4-itrex"], kl["wt2-awq"]), kl
    for name, value in found.items():
        assert len(value["text"].strip()) > 10, (name, value["text"])  # a trained model continues with words


def test_layer_map_follows_module_names_and_widths():
    transformers = pytest.importorskip("transformers")
    from engine.runtimes.itrex_build import absorb_map

    def llama(kv_heads):
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=kv_heads)
        return transformers.AutoModelForCausalLM.from_config(config)

    full = {"input_layernorm": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            "post_attention_layernorm": ["mlp.gate_proj", "mlp.up_proj"],
            "self_attn.v_proj": ["self_attn.o_proj"], "mlp.up_proj": ["mlp.down_proj"]}
    assert absorb_map(llama(4)) == full
    # grouped-query attention: v_proj is narrower than o_proj's input, its scale cannot be folded there
    assert absorb_map(llama(2)) == {k: v for k, v in full.items() if k != "self_attn.v_proj"}
