"""Recipe tasks beyond causal LMs (issue 11): feature-extraction (BERT/BGE-style sentence embeddings)
and text2text-generation (T5-style), on openvino and itrex, through the real CLI, real exports and
quantizers, and fresh Python processes; the LangChain adapters on them.

The four builds are made once (module fixture, two CLI processes side by side, ~2-3 min); every
check that loads a model runs in one fresh interpreter to pay the imports once.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from clirun import engine, python_json

from engine.errors import RecipeInvalid
from engine.plan import make_plan
from engine.recipe import load_recipe, parse_recipe
from engine.store import Store

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"
PAIRS = ROOT / "data" / "text2text" / "qa.tsv"


def _has(*modules: str) -> bool:
    import importlib.util

    try:
        return all(importlib.util.find_spec(m) is not None for m in modules)
    except ModuleNotFoundError:
        return False


needs_both = pytest.mark.skipif(not (_has("openvino", "optimum.intel", "nncf") and _has("neural_compressor")),
                                reason="needs the openvino and itrex runtimes (engine[openvino,itrex])")

RECIPE = """\
name: {name}
task: {task}
source: {{synthetic: {{architecture: {arch}, seed: 0}}}}
quantization: {{weight_dtype: int8, group_size: {group}}}
target: {{runtime: {runtime}}}
{eval}
"""
VARIANTS = {  # name -> (task, architecture, runtime, group, eval section)
    "bert-ov": ("feature-extraction", "bert", "openvino", -1,
                f"eval: {{embeddings: {{dataset: {WIKI}, queries: 16, passages: 64}}}}"),
    "bert-itrex": ("feature-extraction", "bert", "itrex", 32,
                   f"eval: {{embeddings: {{dataset: {WIKI}, queries: 16, passages: 64}}}}"),
    "t5-ov": ("text2text-generation", "t5", "openvino", -1, ""),
    "t5-itrex": ("text2text-generation", "t5", "itrex", 32,
                 f"eval: {{text2text: {{dataset: {PAIRS}, max_pairs: 8}}, speed: {{prompt_tokens: 16, new_tokens: 8}}}}"),
}


def write(folder: Path, name: str, task: str, arch: str, runtime: str, group: int, eval_section: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(RECIPE.format(name=name, task=task, arch=arch, runtime=runtime, group=group, eval=eval_section))
    return path


# -- validation and keys (in-process, fast) ------------------------------------------------------
def test_a_runtime_without_the_task_is_refused_naming_those_that_have_it(tmp_path):
    path = write(tmp_path, "ort-bert", "feature-extraction", "bert", "onnxruntime-genai", 32, "")
    proc = engine("apply", str(path), cwd=tmp_path, check=3)
    assert "ort-bert.yaml:2:1: task: runtime 'onnxruntime-genai' does not build task 'feature-extraction'" \
        in proc.stderr, proc.stderr
    assert "use target.runtime: " in proc.stderr and "openvino" in proc.stderr and "itrex" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_eval_sections_of_another_task_are_refused(tmp_path):
    text = RECIPE.format(name="bert-ppl", task="feature-extraction", arch="bert", runtime="openvino", group=-1,
                         eval=f"eval: {{perplexity: {{dataset: {WIKI}}}}}")
    with pytest.raises(RecipeInvalid) as caught:
        parse_recipe(text, "bert-ppl.yaml")
    issue = caught.value.issues[0]
    assert (issue.path, issue.line) == ("eval.perplexity", 6)
    assert "scores text-generation variants; this recipe's task is feature-extraction" in issue.message
    assert issue.hint == "use eval.embeddings for a feature-extraction variant"


def test_the_default_task_keeps_keys_and_another_task_changes_them(tmp_path):
    """Leaving `task` out and writing the default give the same build key (recipes/ keys are pinned in
    test_plan.py); a task changes it, and nothing is filled into the recorded recipe."""
    versions = "9.9.9-{}".format
    keys = {}
    for label, line in (("none", ""), ("default", "task: text-generation\n"), ("t2t", "task: text2text-generation\n")):
        path = tmp_path / f"{label}.yaml"
        path.write_text(f"name: k\n{line}source: {{synthetic: {{architecture: phi3}}}}\n"
                        "quantization: {weight_dtype: int8, group_size: -1}\ntarget: {runtime: openvino}\n")
        recipe = load_recipe(path)
        keys[label] = make_plan(recipe, Store(tmp_path / "store"), versions=versions).build.key
        if label == "none":
            assert "task" not in recipe.data
    assert keys["none"] == keys["default"] != keys["t2t"]


# -- the real thing ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tasks")
    paths = {name: write(work, name, *spec) for name, spec in VARIANTS.items()}
    groups = [[str(paths["bert-ov"]), str(paths["t5-itrex"])], [str(paths["bert-itrex"]), str(paths["t5-ov"])]]
    procs = [subprocess.Popen([sys.executable, "-m", "engine", "apply", *group], cwd=work, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for group in groups]
    outs = [p.communicate(timeout=1200) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, out + err
    return work


@needs_both
def test_embeddings_scores_are_recorded_and_listed(built):
    rows = {r["name"]: r["scores"] for r in json.loads(engine("ls", "--json", cwd=built).stdout)}
    for name in ("bert-ov", "bert-itrex"):
        scores = rows[name]
        assert scores["cosine_mean"]["value"] > 0.99, (name, scores["cosine_mean"])
        assert scores["cosine_min"]["value"] > 0.95, (name, scores["cosine_min"])
        assert scores["retrieval_top10_agreement"]["value"] >= 0.8, (name, scores)
        assert scores["sentences_per_s"]["value"] > 0 and scores["size_ratio"]["value"] < 1
    t5 = rows["t5-itrex"]
    assert t5["top1_agreement"]["value"] > 0.9 and 0 <= t5["kl_divergence"]["value"] < 0.05
    assert t5["target_perplexity"]["value"] > 0
    table = engine("ls", cwd=built).stdout
    assert "cos" in table.splitlines()[0] and "top10" in table.splitlines()[0]
    # sizes of an embedder and a text2text model are never read side by side
    diff = json.loads(engine("diff", "bert-ov", "t5-itrex", "--json", cwd=built).stdout)
    assert all(not s["comparable"] for s in diff["scores"]), diff["scores"]


@needs_both
def test_models_embed_generate_and_refuse_the_other_task_in_a_fresh_process(built):
    found = python_json("""
        import json
        import numpy as np
        import engine
        from engine.tasks import WrongTask

        out = {}
        texts = ["The river rises in the hills.", "A quick brown fox.", "Quantization keeps weights small."]
        for name in ("bert-ov", "bert-itrex"):
            m = engine.load(name)
            e = m.embed(texts, batch_size=2)
            raw = m.embed(texts, normalize=False)
            q = m.embed(texts[:1], instruction="Represent this sentence for searching relevant passages: ")
            try:
                m.generate("hello")
                refused = None
            except WrongTask as error:
                refused = str(error)
            out[name] = {"shape": list(e.shape), "dtype": str(e.dtype), "norms": np.linalg.norm(e, axis=1).tolist(),
                         "raw_norm": float(np.linalg.norm(raw[0])), "empty": list(m.embed([]).shape),
                         "same_dir": float((e[0] * raw[0] / np.linalg.norm(raw[0])).sum()),
                         "instruction_moves": float((q[0] * e[0]).sum()), "pooling": m.pooling,
                         "refused": refused, "vectors": e.tolist()}
        for name in ("t5-ov", "t5-itrex"):
            m = engine.load(name)
            one = m.generate("Answer the question: What do bees make?", max_new_tokens=8)
            batch = m.generate(["Answer the question: What do bees make?", "Translate: hello"], max_new_tokens=8)
            streamed = "".join(m.stream("Answer the question: What do bees make?", max_new_tokens=8))
            try:
                m.embed(["x"])
                refused = None
            except WrongTask as error:
                refused = str(error)
            out[name] = {"one": str(one), "batch": [str(b) for b in batch], "stream": streamed,
                         "new_tokens": one.new_tokens, "refused": refused}
        print(json.dumps(out))
    """, cwd=built)
    for name in ("bert-ov", "bert-itrex"):
        got = found[name]
        assert got["shape"] == [3, 64] and got["dtype"] == "float32" and got["empty"] == [0, 64]
        assert all(abs(n - 1) < 1e-5 for n in got["norms"]) and abs(got["raw_norm"] - 1) > 1e-3
        assert got["same_dir"] > 0.9999 and got["instruction_moves"] < 0.9999 and got["pooling"] == "cls"
        assert got["refused"].startswith(f"{name}@1 is a feature-extraction variant") and "cannot generate" in got["refused"]
    import numpy as np

    a, b = np.array(found["bert-ov"]["vectors"]), np.array(found["bert-itrex"]["vectors"])
    assert ((a * b).sum(axis=1) > 0.99).all()  # two runtimes, int8 each: the same embeddings
    for name in ("t5-ov", "t5-itrex"):
        got = found[name]
        assert got["new_tokens"] > 0 and got["one"] and got["batch"][0] == got["one"] == got["stream"]
        assert "text2text-generation variant" in got["refused"] and "cannot embed" in got["refused"]


@needs_both
def test_langchain_embeddings_in_a_vector_store_and_llm_on_text2text(built):
    pytest.importorskip("langchain_core", reason="the langchain extra is not installed")
    found = python_json(textwrap.dedent("""
        import json
        from langchain_core.prompts import PromptTemplate
        from langchain_core.vectorstores import InMemoryVectorStore
        from engine.integrations.langchain import EngineLLM
        from engine.integrations.langchain_embeddings import EngineEmbeddings
        import engine

        lines = [l.strip() for l in open(%r, encoding="utf-8") if len(l.strip()) > 60][:20]
        emb = EngineEmbeddings(name="bert-itrex", query_instruction="Represent this sentence for searching relevant passages: ")
        store = InMemoryVectorStore(embedding=emb)
        ids = store.add_texts(lines)
        hits = store.similarity_search(lines[3], k=3)
        model = engine.load("bert-itrex")
        direct = model.embed([lines[3]], instruction=emb.query_instruction)[0]
        expected = lines[int((model.embed(lines) @ direct).argmax())]
        plain = InMemoryVectorStore(embedding=EngineEmbeddings(name="bert-ov"))
        plain.add_texts(lines)
        itself = plain.similarity_search(lines[5], k=1)[0].page_content

        llm = EngineLLM(name="t5-ov", max_new_tokens=8)
        chain = PromptTemplate.from_template("Answer the question: {q}") | llm
        qs = ["What do bees make?", "What is frozen water called?"]
        one, many = chain.invoke({"q": qs[0]}), chain.batch([{"q": q} for q in qs])
        full = llm.invoke("Answer the question: What do bees make?")
        stop = full[2:4]
        print(json.dumps({"n": len(ids), "top": hits[0].page_content, "expected": expected,
                          "itself": itself == lines[5], "q_vec": emb.embed_query(lines[3]), "direct": direct.tolist(),
                          "docs": len(emb.embed_documents(lines[:2])), "one": one, "many": many,
                          "full": full, "stop": stop, "stopped": llm.bind(stop=[stop]).invoke(
                              "Answer the question: What do bees make?")}))
    """ % str(WIKI)), cwd=built)
    assert found["n"] == 20 and found["docs"] == 2
    assert found["top"] == found["expected"]  # the store ranks by the engine's own vectors
    assert found["itself"]  # without an instruction a passage finds itself first
    assert max(abs(x - y) for x, y in zip(found["q_vec"], found["direct"])) < 1e-5
    assert found["many"][0] == found["one"] and len(found["many"]) == 2
    assert found["stopped"] == found["full"][: found["full"].index(found["stop"])]


def test_pooling_is_read_from_the_folder_and_said_when_absent(tmp_path):
    import numpy as np

    from engine.embedding import pool, read_pooling
    from engine.synthetic_encoders import write_pooling

    assert read_pooling(tmp_path) == ("mean", "no sentence-transformers pooling config (1_Pooling/config.json) "
                                              "in the model: mean pooling")
    write_pooling(tmp_path, 4, "cls")
    assert read_pooling(tmp_path) == ("cls", "1_Pooling/config.json: cls")
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "p", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    assert read_pooling(tmp_path)[0] == "mean"
    states = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    assert np.allclose(pool(states, mask, "mean"), [[1, 2], [8, 9]])  # the padded position is left out
    assert np.allclose(pool(states, mask, "cls"), [[0, 1], [6, 7]])
    assert np.allclose(pool(states, mask, "lasttoken"), [[2, 3], [10, 11]])
