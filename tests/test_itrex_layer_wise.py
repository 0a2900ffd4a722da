"""itrex RTN builds layer by layer (INC's layer-wise mode) and makes the same artifact as the whole-model
build: every file byte-identical (quantized_weight.pt, qconfig.json, itrex.json with the probe digest),
so the build key does not change. Its peak, measured in a fresh child, stays below the whole-model
build's by about the fp32 model, and within the estimate ItrexRuntime.build_memory gives.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from clirun import make_synthetic_in_child

from engine.discovery import get_runtime
from engine.memory import GB, facts_from_config, facts_from_folder, gb

try:
    metadata.version("neural-compressor-pt")
except metadata.PackageNotFoundError:
    pytest.skip("the itrex runtime is not installed (engine[itrex])", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "wt2-phi3-7m"
TIED = ROOT.parent / "shared" / "data" / "models" / "stories260K"  # a real llama with tied embeddings
#: Phi-3.5-mini-instruct's config (tests/test_memory.py has the same)
PHI35 = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "torch_dtype": "bfloat16",
         "tie_word_embeddings": False}
INT4 = {"dtype": "int", "bits": 4, "use_sym": True, "group_size": 32, "use_full_range": False,
        "use_mse_search": False, "use_layer_wise": False, "quant_lm_head": False}
#: the build child's environment (ItrexRuntime.build sets the same mmap threshold)
#: the tolerance of tests/test_memory.py: an estimate may be 15% above a measured peak, 5% below
def within(estimate: int, measured: float, low: float = 0.05, high: float = 0.15) -> bool:
    return measured * (1 - low) <= estimate <= measured * (1 + high)


CHILD_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "1048576", "HF_HUB_OFFLINE": "1"}


def job(source: Path, out: Path, layer_wise: bool, inc: dict | None = None, skip: list | None = None) -> dict:
    return {"source_dir": str(source), "out_dir": str(out), "algorithm": "rtn", "inc": {**INT4, **(inc or {})},
            "skip_modules": skip or [], "itrex": {}, "seed": 0, "teq": None, "task": "text-generation",
            "layer_wise": layer_wise}


CHILD = textwrap.dedent("""
    import json, sys
    from engine.runtimes.itrex_build import run
    results = [run(job) for job in json.loads(sys.argv[1])]
    hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps([results, hwm]))
""")


def start_jobs(jobs: list[dict]) -> subprocess.Popen:
    """engine.runtimes.itrex_build.run for each job, in one fresh child."""
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(jobs)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CHILD_ENV, cwd=ROOT)


def results_of(child: subprocess.Popen) -> list[dict]:
    """The jobs' results, each with the child's peak RSS (VmHWM) as `_hwm`."""
    out, err = child.communicate(timeout=600)
    assert child.returncode == 0, err[-4000:]
    results, hwm = json.loads(out.splitlines()[-1])
    return [{**r, "_hwm": hwm} for r in results]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_layer_wise_rtn_writes_the_whole_model_builds_bytes(tmp_path):
    """bf16 phi3 with skipped layers (lm_head, a whole block, one Linear) at int4 full range; a tied
    llama at int8 asymmetric with the MSE clip search. Both ways, every file the same."""
    cases = [(SHIPPED, {"use_full_range": True}, ["lm_head", "model.layers.1", "model.layers.5.mlp.down_proj"])]
    if TIED.is_dir():
        cases.append((TIED, {"bits": 8, "use_sym": False, "use_mse_search": True}, []))
    children = [start_jobs([job(source, tmp_path / f"{i}-whole", False, inc, skip),
                            job(source, tmp_path / f"{i}-lw", True, inc, skip)])
                for i, (source, inc, skip) in enumerate(cases)]  # one child a case, side by side
    for i, child in enumerate(children):
        whole, lw = results_of(child)
        assert (whole["build_mode"], lw["build_mode"]) == ("whole-model", "layer-wise")
        assert whole["probe"]["logits_sha256"] == lw["probe"]["logits_sha256"]
        files = digests(tmp_path / f"{i}-whole")
        assert {"quantized_weight.pt", "qconfig.json", "itrex.json"} <= set(files)
        assert files == digests(tmp_path / f"{i}-lw"), cases[i][0].name
    qconfig = json.loads((tmp_path / "0-lw" / "qconfig.json").read_text())
    assert not any(c["rtn"]["use_layer_wise"] for c in qconfig.values())  # as the whole-model build wrote it


def test_the_engine_quantizes_rtn_of_causal_lms_layer_by_layer_and_estimates_that():
    from engine.runtimes.itrex import layer_wise_build

    itrex = get_runtime("itrex")
    facts = facts_from_config(PHI35)
    rtn = {"algorithm": "rtn", "inc": INT4, "_task": "text-generation"}
    assert layer_wise_build(rtn)
    assert not layer_wise_build({**rtn, "algorithm": "gptq"})
    assert not layer_wise_build({**rtn, "_task": "feature-extraction"})
    lw, whole = itrex.build_memory(facts, rtn), itrex.build_memory(facts, {**rtn, "algorithm": "gptq"})
    assert "layer by layer" in lw.note and lw.anonymous < whole.anonymous / 2
    # benchmarks/big_model.py, Phi-3.5-mini's shapes, int4 g32: the build child's VmHWM 5.84 GB (reload check)
    assert within(lw.peak_rss, 5.84 * GB), gb(lw.peak_rss)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """~77 M parameters in fp32 (0.31 GB): the model, not the interpreter, makes the difference."""
    from engine.synthetic import with_defaults

    folder = tmp_path_factory.mktemp("big") / "model"
    spec = with_defaults({"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6,
                          "num_attention_heads": 8})
    return make_synthetic_in_child(spec, folder)


def test_layer_wise_build_peak_stays_below_the_whole_model_build(big_model, tmp_path):
    """Each build alone in a fresh child (VmHWM): layer by layer needs about the fp32 model less, and
    stays within its estimate (20% low allowed at this size, where the interpreter is most of it)."""
    facts = facts_from_folder(big_model)
    assert facts.params > 70e6
    children = [start_jobs([job(big_model, tmp_path / name, name == "lw")]) for name in ("whole", "lw")]
    whole, lw = (results_of(child)[0] for child in children)  # side by side: one core each
    assert lw["build_mode"] == "layer-wise" and whole["probe"] == lw["probe"]
    assert lw["_hwm"] < whole["_hwm"] - 2 * facts.params, (gb(lw["_hwm"]), gb(whole["_hwm"]))  # half the fp32 model
    estimate = get_runtime("itrex").build_memory(facts, {"algorithm": "rtn", "inc": INT4}).peak_rss
    assert within(estimate, lw["_hwm"], low=0.2), (gb(estimate), gb(lw["_hwm"]))
