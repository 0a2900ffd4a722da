"""One inference API for every runtime: generate, batches, stream, stop, chat, `engine run`/`chat`,
and the LangChain LLM. Each runtime present is built once on the trained model that ships in
models/wt2-phi3-7m and driven through the same assertions."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from clirun import engine as engine_cli
from clirun import library_lines
from runtimes_present import unavailable

import engine
from engine.discovery import get_runtime, runtime_names
from engine.errors import EngineError
from engine.runtime import Runtime

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "models" / "wt2-phi3-7m"  # the trained model that ships with the repository
#: llama.cpp's converter does not recognize the byte-level BPE tokenizer of wt2-phi3-7m (nor the
#: synthetic models'): it takes the SentencePiece fixture, given wt2-phi3-7m's chat template
SENTENCEPIECE = {"llama.cpp": ROOT.parent / "shared" / "data" / "models" / "wt2-llama-sp"}
PROMPTS = ["The history of the", "In 1998 , the band released", "He was born in", "The"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference")


@pytest.fixture(scope="module", params=runtime_names())
def model(request, work):
    """Every installed runtime, each building its own example_quantization (a runtime whose
    packages are absent is skipped, saying which)."""
    runtime = request.param
    reason = unavailable(get_runtime(runtime))
    if reason:
        pytest.skip(reason)
    source = f"{{path: {FIXTURE}}}"
    if runtime in SENTENCEPIECE:
        fixture = SENTENCEPIECE[runtime]
        if not fixture.is_dir():
            pytest.skip(f"runtime {runtime} needs {fixture} (../shared/data beside the project)")
        folder = work / f"{runtime}-source"  # a copy: a source folder's links may not lead outside it
        folder.mkdir(exist_ok=True)
        for item in [*fixture.iterdir(), FIXTURE / "chat_template.jinja"]:
            if item.is_file() and not (folder / item.name).exists():
                shutil.copy2(item, folder / item.name)
        source = f"{{path: {folder}}}"
    name = f"inf-{runtime}"
    recipe = work / f"{name}.yaml"
    quantization = json.dumps(get_runtime(runtime).example_quantization)  # JSON is YAML
    recipe.write_text(f"name: {name}\nsource: {source}\nquantization: {quantization}\n"
                      f"target: {{runtime: {runtime}}}\n")
    proc = subprocess.run([sys.executable, "-m", "engine", "apply", str(recipe)], cwd=work,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert not library_lines(proc.stdout + proc.stderr), library_lines(proc.stdout + proc.stderr)
    return engine.load(name, registry=work / "registry.db")


def test_greedy_generate_equals_concatenated_stream(model):
    for prompt in PROMPTS[:2]:
        text = model.generate(prompt, max_new_tokens=24)
        pieces = list(model.stream(prompt, max_new_tokens=24))
        assert len(pieces) > 1 and "".join(pieces) == text
        assert text.new_tokens > 0 and text.prompt_tokens > 0 and text.seconds > 0


def test_batch_equals_single_answers(model):
    singles = [model.generate(p, max_new_tokens=16) for p in PROMPTS]
    batch = model.generate(PROMPTS, max_new_tokens=16)
    assert isinstance(batch, list) and len(batch) == 4
    assert [str(t) for t in batch] == [str(t) for t in singles]


def test_stop_sequences_cut_generate_and_stream(model):
    full = str(model.generate(PROMPTS[2], max_new_tokens=32))
    stop = "\n" if "\n" in full.strip("\n") else full.strip()[6:8]
    assert stop and stop in full
    expected = full[: full.index(stop)]
    cut = model.generate(PROMPTS[2], max_new_tokens=32, stop=[stop])
    assert str(cut) == expected and cut.finish_reason == "stop"
    assert "".join(model.stream(PROMPTS[2], max_new_tokens=32, stop=[stop])) == expected


def test_sampling_is_seeded(model):
    a = model.generate(PROMPTS[0], max_new_tokens=12, do_sample=True, temperature=1.0, top_k=50, seed=7)
    b = model.generate(PROMPTS[0], max_new_tokens=12, do_sample=True, temperature=1.0, top_k=50, seed=7)
    assert str(a) == str(b)


def test_chat_uses_the_models_template(model):
    messages = [{"role": "user", "content": "Tell me about the river."}]
    prompt = model.apply_chat_template(messages)
    assert "Tell me about the river." in prompt and "<|assistant|>" in prompt
    answer = model.chat(messages, max_new_tokens=12)
    assert answer == model.generate(prompt, max_new_tokens=12)
    assert "".join(model.stream(messages, max_new_tokens=12)) == answer
    with pytest.raises(EngineError):
        model.chat([{"role": "user"}])


def test_langchain_chain_invoke_batch_stream_and_bind(model):
    pytest.importorskip("langchain_core", reason="the langchain extra is not installed")
    from langchain_core.prompts import PromptTemplate

    from engine.integrations.langchain import EngineLLM

    llm = EngineLLM(name=model.name, registry=str(Path(model.info.artifact_dir).parents[3] / "registry.db"),
                    max_new_tokens=16)
    chain = PromptTemplate.from_template("Question: {question}\nAnswer:") | llm
    questions = ["Who was he?", "Where is the river?", "When did it open?"]
    one = chain.invoke({"question": questions[0]})
    many = chain.batch([{"question": q} for q in questions])
    assert isinstance(one, str) and len(many) == 3 and many[0] == one
    assert many == [str(t) for t in model.generate([f"Question: {q}\nAnswer:" for q in questions], max_new_tokens=16)]
    assert "".join(llm.stream("The history of the")) == str(model.generate("The history of the", max_new_tokens=16))
    full = str(model.generate("The history of the", max_new_tokens=16))
    stop = full.strip()[3:5]
    assert llm.bind(stop=[stop]).invoke("The history of the") == full[: full.index(stop)]


def test_show_reads_what_the_weights_became(model, work):
    """engine show lists each module kind's precision as read from the artifact (ONNX graph,
    OpenVINO IR, INC's packed modules), not as the recipe says it."""
    runtime = get_runtime(model.info.runtime)
    if type(runtime).weight_precisions is Runtime.weight_precisions:
        pytest.skip(f"runtime {runtime.name} records its tensor types its own way (engine show's sections)")
    doc = json.loads(engine_cli("show", model.name, "--json", cwd=work).stdout)
    weights = doc["build_meta"]["weights"]
    quant = get_runtime(model.info.runtime).example_quantization
    group = quant.get("group_size", 32)
    expected = f"{quant['weight_dtype']} " + (f"g{group}" if group > 0 else "per-channel")
    assert set(weights["attention"]) == {expected} and set(weights["mlp"]) == {expected}
    assert weights["lm_head"] and weights["embeddings"]
    assert "weights as built" in engine_cli("show", model.name, cwd=work).stdout


def test_unknown_load_option_is_refused(model):
    with pytest.raises(EngineError) as info:
        engine.load(model.name, registry=Path(model.info.artifact_dir).parents[3] / "registry.db",
                    no_such_option=1)
    assert "no_such_option" in str(info.value)


def test_engine_run_streams_visibly(model, work):
    """The first piece reaches the terminal while the model is still generating."""
    proc = subprocess.Popen([sys.executable, "-m", "engine", "run", model.name, "The history of the",
                             "--max-new-tokens", "400"], cwd=work, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = os.read(proc.stdout.fileno(), 64)
    alive_after_first = proc.poll() is None
    rest = proc.stdout.read()
    proc.wait(timeout=300)
    assert proc.returncode == 0, proc.stderr.read()
    assert first and rest and alive_after_first
    # stdout is the answer and nothing else; no library line on stderr (issue 16)
    assert (first + rest).decode() == str(model.generate("The history of the", max_new_tokens=400)) + "\n"
    assert not library_lines(proc.stderr.read().decode())


def test_engine_chat_keeps_history_and_ends_on_eof(model, work):
    proc = subprocess.run([sys.executable, "-m", "engine", "chat", model.name, "--max-new-tokens", "8"],
                          cwd=work, input="Hello there\nAnd then?\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first = model.chat([{"role": "user", "content": "Hello there"}], max_new_tokens=8)
    second = model.chat([{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": str(first)},
                         {"role": "user", "content": "And then?"}], max_new_tokens=8)
    assert proc.stdout == f"> {first}\n> {second}\n> "  # two answers, then the prompt that met end of input
    assert not library_lines(proc.stderr)
