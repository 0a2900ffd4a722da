"""Runtime `llama.cpp`: the real converter, llama-imatrix and llama-quantize on the trained
SentencePiece fixture wt2-llama-sp, ready-made GGUF files as sources, loading with llama-cpp-python.

The fast tests (validation, planning, source keys) need no build. The others build once per module
(one `engine apply` of six recipes) and read the results; they need ../shared/data and the
llama.cpp toolkit (`make install`), and skip saying which is missing.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from clirun import engine
from clirun import python_json as python

from engine.plan import make_plan
from engine.recipe import load_recipe
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
LLAMA_SP = SHARED / "models" / "wt2-llama-sp"
READY = SHARED / "models" / "wt2-llama-sp-gguf" / "wt2-llama-sp.Q4_K_M.gguf"
STORIES = SHARED / "models" / "stories260K" / "stories260K.gguf"
PHI3 = SHARED / "models" / "wt2-phi3-7m"
WIKI = SHARED / "wikitext-2" / "wiki.test.raw"
EVAL = "eval:\n  perplexity: {{dataset: {wiki}, window: 128, max_windows: 8}}\n  speed: {{prompt_tokens: 32, new_tokens: 16}}\n"


def fixed(dist: str) -> str:
    return "9.9.9-" + dist


def toolkit_missing() -> str | None:
    try:
        from engine.runtimes.llamacpp_tools import find

        find()
    except Exception as error:  # RuntimeUnavailable: not installed; say why
        return f"the llama.cpp runtime is not installed here: {getattr(error, 'message', error)}"
    return None


def shared_missing() -> str | None:
    for path in (LLAMA_SP, READY, STORIES, WIKI):
        if not path.exists():
            return f"needs {path} (../shared/data beside the project)"
    return None


needs_build = pytest.mark.skipif(toolkit_missing() is not None, reason=str(toolkit_missing()))
needs_shared = pytest.mark.skipif(shared_missing() is not None, reason=str(shared_missing()))


def write(folder: Path, name: str, body: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\n" + textwrap.dedent(body))
    return path


# -- fast: validation, planning, source keys ------------------------------------------------------
@needs_shared
@pytest.mark.shared_data
def test_a_ready_made_gguf_contradicted_by_the_recipe_is_refused_at_its_lines(tmp_path):
    recipe = write(tmp_path, "imp", f"""\
        source: {{path: {READY}}}
        quantization:
          weight_dtype: int8
        target:
          runtime: llama.cpp
          options: {{ftype: Q8_0}}
        """)
    proc = engine("apply", str(recipe), cwd=tmp_path, check=3)
    assert f"{recipe}:4:3: quantization.weight_dtype: 'int8' contradicts the file, which is Q4_K_M" in proc.stderr
    assert f"{recipe}:7:13: target.options.ftype: 'Q8_0' contradicts the file" in proc.stderr
    assert "hint: write weight_dtype: int4" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "registry.db").exists()


def test_what_has_no_llamacpp_meaning_is_refused_with_the_supported_values(tmp_path):
    recipe = write(tmp_path, "bad", """\
        source: {synthetic: {architecture: llama}}
        quantization: {group_size: 64, scheme: asym, mse_range: true, scale_dtype: fp16}
        target: {runtime: llama.cpp, options: {ftype: IQ2_XS}}
        """)
    err = engine("validate", str(recipe), cwd=tmp_path, check=3).stderr
    assert "quantization.group_size: 64 is not supported by runtime 'llama.cpp' (supported: 32)" in err
    assert "quantization.scheme: 'asym' is not supported by runtime 'llama.cpp'" in err
    assert "quantization.mse_range" in err and "quantization.scale_dtype" in err
    assert "needs an importance matrix" in err and "quantization.calibration" in err
    assert "Traceback" not in err


@needs_shared
@pytest.mark.shared_data
def test_other_runtimes_refuse_a_gguf_source(tmp_path):
    recipe = write(tmp_path, "ovg", f"source: {{path: {READY}}}\ntarget: {{runtime: onnxruntime-genai}}\n")
    err = engine("apply", str(recipe), cwd=tmp_path, check=3).stderr
    assert f"{recipe}:2:1: source: runtime 'onnxruntime-genai' cannot build from a gguf file" in err
    assert "llama.cpp" in err


@needs_shared
@pytest.mark.shared_data
def test_scoring_shares_the_loaded_weights_and_gives_llama_cpps_own_logits():
    """The scorer is a second context on the generation model (llama.cpp repacks weights into the
    process's memory: a second `Llama` held them twice), and its logits are those of a plain
    `Llama(logits_all=True)` on the same file, to the bit."""
    import numpy as np
    from llama_cpp import Llama

    from engine.records import VariantRecord
    from engine.runtimes.llamacpp import LlamaCppModel

    model = LlamaCppModel(VariantRecord(name="ready", version=1, runtime="llama.cpp"), READY, {})
    ids = model.encode(" ".join(WIKI.read_text(encoding="utf-8").split()[:400]))
    short, long = ids[:100], ids[:600]
    got = model.logits(short)
    assert model._scorer._ctx.model is model.native._model  # one copy of the weights
    plain = Llama(model_path=str(READY), verbose=False, n_ctx=512, n_batch=512, n_ubatch=512, logits_all=True)
    plain.eval(short)
    assert got.dtype == np.float32 and np.array_equal(got, np.array(plain.scores[:100], dtype=np.float32))
    assert np.array_equal(model.logits(short), got)  # the cache of the first call is cleared
    assert model.logits(long).shape == (600, plain.n_vocab()) and model._scorer.n_ctx == 600
    assert np.array_equal(model.logits(short), got)  # the larger context gives the same numbers
    assert model.generate("The history of the", max_new_tokens=4).new_tokens > 0  # generation is untouched


def test_gguf_source_keys_and_eval_reference(tmp_path):
    """A .gguf path is keyed by its sha256; eval.reference gives the reference pass its own input;
    without one, perplexity only (on the variant's tokens), and fidelity written is refused."""
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + b"\0" * 60)
    (tmp_path / "ref").mkdir()
    (tmp_path / "ref" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "text.txt").write_text("The river rises in the hills.\n")
    body = "source: {path: m.gguf}\ntarget: {runtime: llama.cpp}\neval:\n  perplexity: {dataset: text.txt}\n"
    store = Store(tmp_path / "store")
    alone = make_plan(load_recipe(write(tmp_path, "alone", body)), store, versions=fixed)
    import hashlib

    assert alone.source == {**alone.source, "kind": "gguf",
                            "identity": {"gguf_sha256": hashlib.sha256((tmp_path / "m.gguf").read_bytes()).hexdigest()}}
    assert [s.kind for s in alone.steps] == ["source", "build", "eval"]
    assert alone.spec["perplexity"]["fidelity"] is False and alone.spec["perplexity"]["tokens"] == "variant tokenizer"
    referenced = make_plan(load_recipe(write(tmp_path, "ref", body + "  reference: {path: ref}\n")), store,
                           versions=fixed)
    assert [s.kind for s in referenced.steps] == ["source", "build", "reference", "eval"]
    assert referenced.build.key == alone.build.key and referenced.reference_step.kind == "source"
    hf = make_plan(load_recipe(write(tmp_path, "hf", "source: {path: ref}\ntarget: {runtime: llama.cpp}\n"
                                     "eval:\n  perplexity: {dataset: text.txt}\n")), store, versions=fixed)
    assert hf.step("reference").key == referenced.step("reference").key  # same reference, same pass
    with pytest.raises(Exception) as info:
        make_plan(load_recipe(write(tmp_path, "fid", body + "  fidelity: true\n")), store, versions=fixed)
    assert "eval.fidelity" in str(info.value) and "reference" in str(info.value)


# -- built once: the trained fixture at four types, two imports ------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    reason = shared_missing() or toolkit_missing()
    if reason:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("llamacpp")
    lines = [line.strip() for line in WIKI.read_text(encoding="utf-8").splitlines()
             if len(line.strip()) > 80 and not line.strip().startswith("=")]
    (work / "calib.txt").write_text("\n".join(lines[-200:]) + "\n")  # the test split's end; eval reads its start
    ev = EVAL.format(wiki=WIKI)
    src = f"source: {{path: {LLAMA_SP}}}\n"
    recipes = [
        write(work, "wt2-q8", src + "quantization: {weight_dtype: int8}\ntarget: {runtime: llama.cpp}\n" + ev),
        write(work, "wt2-q4km", src + "quantization: {weight_dtype: int4}\ntarget: {runtime: llama.cpp}\n" + ev),
        write(work, "wt2-q4km-imatrix", src + "quantization:\n  weight_dtype: int4\n"
              "  calibration: {dataset: calib.txt, samples: 200, seq_len: 128}\ntarget: {runtime: llama.cpp}\n" + ev),
        write(work, "wt2-f16", src + "quantization: {weight_dtype: fp16}\ntarget: {runtime: llama.cpp}\n" + ev),
        write(work, "wt2-ready-q4km", f"source: {{path: {READY}}}\ntarget: {{runtime: llama.cpp}}\n" + ev
              + f"  reference: {{path: {LLAMA_SP}}}\n"),
        write(work, "stories-gguf", f"source: {{path: {STORIES}}}\ntarget: {{runtime: llama.cpp}}\n"
              + EVAL.format(wiki=WIKI).replace("window: 128", "window: 64")),
    ]
    out = engine("apply", *map(str, recipes), cwd=work).stdout
    for recipe in recipes:
        assert f"{recipe.stem}@1: built" in out, out
    return work


def scores(work: Path, name: str) -> dict:
    doc = json.loads(engine("show", name, "--json", cwd=work).stdout)
    return {metric: score["value"] for metric, score in doc["scores"].items()}


@pytest.mark.slow
@pytest.mark.shared_data
def test_each_variant_loads_in_a_fresh_process_generates_and_loads_in_plain_llama_cpp(built):
    found = python("""
        import json
        from llama_cpp import Llama
        import engine
        out = {}
        for name in ["wt2-q8", "wt2-q4km", "wt2-q4km-imatrix", "wt2-f16", "wt2-ready-q4km", "stories-gguf"]:
            m = engine.load(name)
            prompt = "The history of the" if name.startswith("wt2") else "Once upon a time"
            text = m.generate(prompt, max_new_tokens=16)
            plain = Llama(model_path=m.info.artifact_dir + "/model.gguf", verbose=False)
            ids = plain.tokenize(prompt.encode(), add_bos=True)
            direct = []
            for t in plain.generate(ids, temp=0.0, top_k=1, min_p=0.0):
                if t == plain.token_eos() or len(direct) == 16:
                    break
                direct.append(t)
            out[name] = {"text": str(text), "new": text.new_tokens, "direct": plain.detokenize(direct).decode()}
        print(json.dumps(out))
    """, built)
    for name, got in found.items():
        assert got["new"] > 0 and len(got["text"].strip()) > 5, (name, got)
        assert got["text"] == got["direct"], (name, got)  # the engine's greedy text is llama.cpp's own
    assert found["wt2-q8"]["text"].startswith(" ")  # SentencePiece: the space before the first word is kept
    assert found["stories-gguf"]["text"].startswith(", there was a little girl")


@pytest.mark.slow
@pytest.mark.shared_data
def test_kl_orders_the_types_and_imports_are_scored(built):
    q8, q4, imx, f16, ready = (scores(built, n) for n in ("wt2-q8", "wt2-q4km", "wt2-q4km-imatrix", "wt2-f16",
                                                          "wt2-ready-q4km"))
    assert f16["kl_divergence"] < q8["kl_divergence"] < q4["kl_divergence"]
    assert imx["kl_divergence"] < 2 * q4["kl_divergence"]  # measured (docs/llamacpp.md): lower, on this fixture
    assert ready["kl_divergence"] > 0 and 0.5 < ready["top1_agreement"] <= 1
    assert ready["source_perplexity"] == q4["source_perplexity"]  # the same reference pass
    stories = scores(built, "stories-gguf")
    assert stories["perplexity"] > 1 and "kl_divergence" not in stories  # no reference: perplexity only


@pytest.mark.slow
@pytest.mark.shared_data
def test_show_names_the_file_type_and_its_tensor_types(built):
    out = engine("show", "wt2-q4km-imatrix", cwd=built).stdout
    assert "Q4_K_M" in out and "Q4_K" in out and "Q6_K" in out and "llama-imatrix" in out
    doc = json.loads(engine("show", "wt2-ready-q4km", "--json", cwd=built).stdout)
    meta = doc["build_meta"]
    assert meta["imported"] and meta["ftype"] == "Q4_K_M" and meta["tensor_types"] == {"Q6_K": 5, "F32": 13, "Q4_K": 39}


@pytest.mark.slow
@pytest.mark.shared_data
def test_verify_catches_a_flipped_byte_in_an_imported_gguf(built, tmp_path):
    work = tmp_path / "w"
    shutil.copytree(built, work, symlinks=True)
    engine("verify", cwd=work)
    folders = python("""
        import json, engine
        print(json.dumps({n: engine.load(n).info.artifact_dir for n in ("wt2-ready-q4km", "stories-gguf")}))
    """, work)
    for name, folder in folders.items():
        path = Path(folder) / "model.gguf"
        assert str(path).startswith(str(work))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.chmod(0o644)
        path.write_bytes(bytes(data))
        err = engine("verify", name, cwd=work, check=4).stderr + engine("verify", name, cwd=work, check=4).stdout
        assert "model.gguf" in err


@pytest.mark.slow
@pytest.mark.shared_data
def test_perplexity_agrees_with_transformers_gguf_loader(built):
    """The engine's perplexity of the imported Q4_K_M vs transformers' GGUF loader (it dequantizes to
    torch) on the same token ids: within 1%."""
    found = python(f"""
        import json
        from pathlib import Path
        import numpy as np, torch
        from transformers import AutoModelForCausalLM
        from engine.metrics import recorded_windows_perplexity
        store = Path({str(built / '.engine')!r})
        ref = json.loads(next(store.rglob("reference.json")).read_text())
        model = AutoModelForCausalLM.from_pretrained({str(READY.parent)!r}, gguf_file={READY.name!r},
                                                     dtype=torch.float32)
        with torch.no_grad():
            ppl = recorded_windows_perplexity(
                ref["windows"], lambda ids: model(torch.tensor([ids])).logits[0].float().numpy())
        print(json.dumps({{"ppl": ppl}}))
    """, built)
    ours = scores(built, "wt2-ready-q4km")["perplexity"]
    assert abs(ours - found["ppl"]) / found["ppl"] < 0.01, (ours, found)


@pytest.mark.slow
@pytest.mark.shared_data
def test_bad_inputs_get_one_message_and_no_traceback(built, tmp_path):
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(READY.read_bytes()[:1_000_000])
    alien = tmp_path / "alien.gguf"
    _write_unknown_architecture(alien)
    recipes = {
        "cut": (f"source: {{path: {truncated}}}\ntarget: {{runtime: llama.cpp}}\n", "is not a complete GGUF file"),
        "alien": (f"source: {{path: {alien}}}\ntarget: {{runtime: llama.cpp}}\n",
                  "llama.cpp does not know the architecture 'no-such-arch'"),
        "phi3": (f"source: {{path: {PHI3}}}\nquantization: {{weight_dtype: int8}}\ntarget: {{runtime: llama.cpp}}\n",
                 "does not recognize this model's tokenizer"),
    }
    for name, (body, message) in recipes.items():
        proc = engine("apply", str(write(tmp_path, name, body)), cwd=tmp_path, check=1)
        assert message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and "hint:" in proc.stderr
    assert "cut" not in engine("ls", cwd=tmp_path, check=None).stdout


def _write_unknown_architecture(path: Path) -> None:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "no-such-arch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@needs_shared
@pytest.mark.shared_data
def test_a_gguf_file_of_a_hub_repository_registers_from_the_offline_cache(tmp_path):
    """`{model, revision, file}`: keyed by repo, commit and file (no download to plan), read from the
    hub cache offline, registered as it is; a wrong file name is one message."""
    from hubcache import repo_folder, write_snapshot

    commit = "0123456789abcdef0123456789abcdef01234567"
    write_snapshot(repo_folder(tmp_path / "hf" / "hub", "org/stories-GGUF"), commit,
                   {"stories260K.gguf": STORIES.read_bytes(), "README.md": b"not needed"}, ref="main")
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    recipe = write(tmp_path, "hub-gguf", f"source: {{model: org/stories-GGUF, revision: {commit}, "
                                         "file: stories260K.gguf}\ntarget: {runtime: llama.cpp}\n")
    assert "hub-gguf@1: built" in engine("apply", str(recipe), cwd=tmp_path, env=env).stdout
    doc = json.loads(engine("show", "hub-gguf", "--json", cwd=tmp_path).stdout)
    assert doc["source"]["identity"] == {"repo": "org/stories-GGUF", "commit": commit, "file": "stories260K.gguf"}
    assert doc["build_meta"]["imported"] and doc["build_meta"]["original_file"] == "stories260K.gguf"
    assert "up to date" in engine("apply", str(recipe), cwd=tmp_path, env=env).stdout
    recipe.write_text(recipe.read_text().replace("file: stories260K.gguf", "file: other.gguf"))
    err = engine("apply", str(recipe), cwd=tmp_path, env=env, check=1).stderr
    assert "org/stories-GGUF" in err and "other.gguf" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.shared_data
def test_a_cached_apply_imports_neither_llama_cpp_nor_torch(built):
    found = python(f"""
        import json, sys, engine
        results = [engine.apply({str(built / 'wt2-q4km-imatrix.yaml')!r}), engine.apply({str(built / 'wt2-ready-q4km.yaml')!r})]
        print(json.dumps({{"rebuilt_nothing": [r.rebuilt_nothing for r in results],
                          "heavy": sorted(m for m in ("torch", "transformers", "llama_cpp", "gguf", "numpy")
                                          if m in sys.modules)}}))
    """, built)
    assert found == {"rebuilt_nothing": [True, True], "heavy": []}


@needs_build
@needs_shared
@pytest.mark.slow
@pytest.mark.shared_data
def test_skip_modules_keep_tensors_at_the_skip_type_and_a_miss_is_named(tmp_path):
    recipe = write(tmp_path, "keep", f"""\
        source: {{path: {LLAMA_SP}}}
        quantization: {{weight_dtype: int4, skip_modules: [lm_head, model.layers.0.mlp.down_proj]}}
        target: {{runtime: llama.cpp, options: {{skip_type: Q8_0}}}}
        """)
    engine("apply", str(recipe), cwd=tmp_path)
    doc = json.loads(engine("show", "keep", "--json", cwd=tmp_path).stdout)
    assert doc["build_meta"]["kept"] == [["lm_head", "output.weight", "Q8_0"],
                                         ["model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", "Q8_0"]]
    assert doc["build_meta"]["tensor_types"]["Q8_0"] == 2
    recipe.write_text(recipe.read_text().replace("model.layers.0.mlp.down_proj", "model.layers.0.mlp.nothing"))
    err = engine("apply", str(recipe), cwd=tmp_path, check=1).stderr
    assert "skip_modules matched no tensor for: model.layers.0.mlp.nothing" in err and "Traceback" not in err
