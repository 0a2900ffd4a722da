"""Memory estimates (engine.memory, engine.admission): facts read without loading a weight, formulas
checked against measurements, and a step that cannot fit refused before any work by the real CLI."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from clirun import engine, make_synthetic_in_child

from engine import memory
from engine.discovery import get_runtime
from engine.memory import GB, facts_from_config, facts_from_folder

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "wt2-phi3-7m"
DATA = ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"
#: Phi-3.5-mini-instruct's config.json (the shapes the issue's measurements were taken on)
PHI35 = {"model_type": "phi3", "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064, "torch_dtype": "bfloat16",
         "tie_word_embeddings": False}
LLAMA3_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
             "tie_word_embeddings": False}
#: stated tolerance of an estimate against a measured peak RSS: it may be 15% high, and at most 5% low
#: (an estimate that is low lets the kernel's OOM killer in; one that is high only refuses early)
HIGH, LOW = 0.15, 0.05


def within(estimate: int, measured: float, low: float = LOW, high: float = HIGH) -> bool:
    return measured * (1 - low) <= estimate <= measured * (1 + high)


#: at ~0.1 B parameters the interpreter and its libraries (~0.5 GB) are half a reference pass's peak, and
#: that base differs between environments: the same whole pass peaked at 0.91 GB in a long-used venv and
#: at 1.0 GB in a fresh clone's (engine modules compiled from source, no bytecode cache)
SMALL_MODEL_LOW = 0.2


def test_headers_and_config_agree_on_the_shipped_model():
    """Two independent readings of the same model: the safetensors headers and config.json's shapes."""
    config = json.loads((SHIPPED / "config.json").read_text())
    from_headers, from_config = facts_from_folder(SHIPPED), facts_from_config(config)
    assert from_headers.read_from == "safetensors headers"
    assert from_headers.params == from_config.params
    assert from_headers.layer_params == from_config.layer_params
    assert from_headers.layers == 6 and from_headers.stored_bytes == 2 * from_headers.params  # bf16
    weights = (SHIPPED / "model.safetensors").stat().st_size
    assert from_headers.stored_bytes < weights < from_headers.stored_bytes + 100_000  # the header is the rest


def test_phi35_shapes_match_the_published_parameter_count():
    assert abs(facts_from_config(PHI35).params - 3.821e9) < 0.002e9


def test_formulas_against_the_measurements_at_phi35_scale():
    """Measured on this machine with a random checkpoint of Phi-3.5-mini's shapes (issue 12):
    onnxruntime-genai int4 build 24.1 GB peak RSS; the fp32 reference pass 22.5 GB."""
    facts = facts_from_config(PHI35)
    # the 24.1 GB was the whole machine: the builder's mapped checkpoint pages were being dropped, so it
    # bounds what the build owns from above and its full demand (owned + mapped) from below
    build = get_runtime("onnxruntime-genai").build_memory(facts, {"precision": "int4"})
    assert build.anonymous <= 24.1 * GB <= build.peak_rss, (memory.gb(build.anonymous), memory.gb(build.peak_rss))
    reference = memory.reference_whole(facts, 512)
    assert within(reference.peak_rss, 22.5 * GB), memory.gb(reference.peak_rss)
    # benchmarks/big_model.py, streamed reference (2 windows of 128): 5.63 GB at Llama-3-8B's shapes (within the
    # tolerance: the embedding term is fitted there); 1.08 GB at Phi-3.5-mini's (the estimate is 43% high: safe side)
    streamed_8b = memory.reference_streamed(facts_from_config(LLAMA3_8B), 128, 2).peak_rss
    assert within(streamed_8b, 5.63 * GB), memory.gb(streamed_8b)
    assert 1.08 * GB <= memory.reference_streamed(facts, 128, 2).peak_rss <= 1.5 * 1.08 * GB
    # benchmarks/big_model.py, llama.cpp Q4_K_M variant of the same shapes being scored: RssAnon 2,284,456 kB
    scoring = get_runtime("llama.cpp").eval_memory(facts, {"ftype": "Q4_K_M"}, 128)
    assert within(scoring.anonymous, 2_284_456 * 1024), memory.gb(scoring.anonymous)
    # Llama-3-8B shapes, Q4_K_M (4.92 GB): engine.load + two windows of 128 scored in a process without torch,
    # RssAnon 4.09 GB at the end (VmHWM 8.94 GB), plus the 0.40 GB torch adds to the engine's process
    scoring_8b = get_runtime("llama.cpp").eval_memory(facts_from_config(LLAMA3_8B), {"ftype": "Q4_K_M"}, 128)
    assert within(scoring_8b.anonymous, (4.09 + 0.40) * GB), memory.gb(scoring_8b.anonymous)
    # an itrex int4 variant of Phi-3.5-mini's shapes scored (2 windows of 128) in the engine's process: 19.99 GB RssAnon
    itrex = get_runtime("itrex").eval_memory(facts, {}, 128)
    assert within(itrex.anonymous, 19.99 * GB), memory.gb(itrex.anonymous)


#: builds measured with benchmarks/build_peak.py (the runtime's own build_params and build, random bf16
#: checkpoints from benchmarks/big_model.py --layers K, each in a 6 GB memory cgroup unless said): the build child's
#: largest RssAnon, sampled every 0.2 s, in bytes. (runtime, shape, layers, precision, measured)
MEASURED_BUILDS = [
    ("onnxruntime-genai", PHI35, 2, "int4", 2_898_952_192),
    ("onnxruntime-genai", PHI35, 4, "int4", 4_126_871_552),
    ("onnxruntime-genai", PHI35, 6, "int4", 5_238_816_768),
    ("onnxruntime-genai", PHI35, 8, "int4", 6_421_471_232),  # these two in a 12 and a 14 GB cgroup
    ("onnxruntime-genai", LLAMA3_8B, 2, "int4", 10_620_735_488),
    ("onnxruntime-genai", PHI35, 2, "int8", 3_279_065_088),
    ("onnxruntime-genai", PHI35, 4, "int8", 4_591_824_896),
    ("openvino", PHI35, 2, "int4", 1_401_982_976),
    ("openvino", PHI35, 4, "int4", 1_165_262_848),
    ("openvino", PHI35, 8, "int4", 1_413_496_832),
    ("openvino", PHI35, 32, "int4", 2_704_400_384),
    ("openvino", PHI35, 2, "int8", 1_126_449_152),
    ("openvino", PHI35, 4, "int8", 1_455_579_136),
    ("openvino", PHI35, 8, "int8", 1_641_119_744),
    ("openvino", PHI35, 32, "int8", 4_326_817_792),
    ("openvino", LLAMA3_8B, 2, "int4", 6_092_713_984),  # 6_131_662_848 in a 12 GB cgroup: not capped
    ("openvino", LLAMA3_8B, 2, "int8", 6_124_134_400),
    ("openvino", LLAMA3_8B, 16, "int4", 6_104_473_600),  # 4.54 B: the same lm_head-set peak, built in 176 s
    # data-aware, 8 calibration samples of 128 tokens (wiki.test.head.raw); GPTQ took 504 s and 999 s
    ("openvino", PHI35, 2, "int4-awq", 1_854_066_688),
    ("openvino", PHI35, 4, "int4-awq", 1_961_824_256),
    ("openvino", PHI35, 2, "int4-gptq", 4_166_246_400),
    ("openvino", PHI35, 4, "int4-gptq", 4_697_616_384),
]
#: below ~1.5 GB the sampled RssAnon of one build varies by ~0.3 GB (openvino at 2 layers: 1.40 GB at int4,
#: 1.13 at int8, where the same largest tensor sets both peaks), so a high estimate may also be 0.5 GB over
SMALL_BUILD_SLACK = int(0.5 * GB)


def build_params(runtime: str, precision: str) -> dict:
    """The build params that matter to the estimate ("int4-awq": int4 with that algorithm)."""
    if runtime != "openvino":
        return {"precision": precision}
    precision, _, algorithm = precision.partition("-")
    config = {"group_size": 32, "quant_method": "awq" if algorithm == "awq" else "default",
              "gptq": algorithm == "gptq"}
    return {"precision": precision, "config": config, **({"calibration": {"samples": 8}} if algorithm else {})}


@pytest.mark.parametrize("runtime,shape,layers,precision,measured", MEASURED_BUILDS)
def test_build_formulas_against_measured_builds(runtime, shape, layers, precision, measured):
    facts = facts_from_config({**shape, "num_hidden_layers": layers})
    estimate = get_runtime(runtime).build_memory(facts, build_params(runtime, precision)).anonymous
    assert estimate >= measured * (1 - LOW), (memory.gb(estimate), memory.gb(measured))
    assert estimate <= measured * (1 + HIGH) or estimate - measured <= SMALL_BUILD_SLACK, \
        (memory.gb(estimate), memory.gb(measured))


def test_openvino_build_estimate_follows_its_parameters():
    """int8 keeps twice the bytes of int4; all_layers compresses the embeddings to 4 bits too; the
    data-aware algorithms add their statistics (GPTQ the most); an uncompressed IR assumes an fp32 copy."""
    ov = get_runtime("openvino")
    facts = facts_from_config(PHI35)
    int4 = ov.build_memory(facts, build_params("openvino", "int4")).anonymous
    int8 = ov.build_memory(facts, build_params("openvino", "int8")).anonymous
    assert int4 < int8 == ov.build_memory(facts, {}).anonymous  # no params: the larger
    every = ov.build_memory(facts, {"precision": "int4", "config": {"group_size": 32, "all_layers": True}})
    assert every.anonymous < int4
    awq = ov.build_memory(facts, build_params("openvino", "int4-awq"))
    gptq = ov.build_memory(facts, build_params("openvino", "int4-gptq"))
    assert int4 < awq.anonymous < gptq.anonymous and "fitted at 0.42-0.65 B only" in gptq.note
    assert ov.build_memory(facts, {"precision": "fp16"}).anonymous > 4 * facts.params
    # at Llama-3-8B's shapes compressing the 525 M-weight lm_head sets the int4 peak, not the weights kept
    big = facts_from_config(LLAMA3_8B)
    assert ov.build_memory(big, build_params("openvino", "int4")).anonymous == memory.TORCH_BASE + 11 * big.embed_params


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A synthetic model big enough (~110 M parameters, 0.44 GB in fp32) that the model, not the
    interpreter, dominates a reference pass's memory; made in a child like the engine makes it."""
    from engine.synthetic import with_defaults

    folder = tmp_path_factory.mktemp("big") / "model"
    spec = with_defaults({"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                          "num_attention_heads": 8})
    return make_synthetic_in_child(spec, folder)


def reference_peak(folder: Path, out: Path, streamed: bool) -> tuple[int, float]:
    """Peak RSS (VmHWM, bytes) of a fresh child computing the reference pass, and its perplexity."""
    code = textwrap.dedent(f"""
        import json
        from pathlib import Path
        from engine.evaluation import compute_reference
        spec = {{"perplexity": {{"window": 128, "stride": 128, "max_windows": 4, "bos": False,
                                "_files": [{str(DATA)!r}], "_hub": None}}}}
        out = Path({str(out)!r}); out.mkdir()
        meta = compute_reference(Path({str(folder)!r}), spec, out, lambda m: None, streamed={streamed})
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child spawned by a large
        # pytest process would report the parent's peak
        hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
        print(json.dumps([hwm, meta["source_perplexity"]]))
    """)
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    peak, ppl = json.loads(done.stdout.splitlines()[-1])
    return peak, ppl


def test_reference_passes_stay_within_their_estimates_and_streaming_bounds_memory(big_model, tmp_path):
    """The whole-model pass against its formula; the streamed pass against its own, and below what
    holding the model in fp32 takes: the bound is measured, not trusted. Same perplexity from both."""
    facts = facts_from_folder(big_model)
    assert facts.params > 100e6
    whole, whole_ppl = reference_peak(big_model, tmp_path / "whole", streamed=False)
    streamed, streamed_ppl = reference_peak(big_model, tmp_path / "streamed", streamed=True)
    whole_estimate = memory.reference_whole(facts, 128).peak_rss
    streamed_estimate = memory.reference_streamed(facts, 128, 4).peak_rss
    assert within(whole_estimate, whole, low=SMALL_MODEL_LOW), (memory.gb(whole_estimate), memory.gb(whole))
    assert within(streamed_estimate, streamed, low=SMALL_MODEL_LOW), (memory.gb(streamed_estimate), memory.gb(streamed))
    assert streamed < whole - 2 * facts.params, (memory.gb(streamed), memory.gb(whole))  # half the fp32 model
    assert streamed_ppl == pytest.approx(whole_ppl, rel=1e-4)


def test_sizes_parse():
    assert memory.parse_size("12G") == 12 * GB
    assert memory.parse_size("1.5GiB") == int(1.5 * 2**30)
    assert memory.parse_size("800M") == 800 * 10**6
    with pytest.raises(ValueError):
        memory.parse_size("lots")


RECIPE = f"""\
name: small
source:
  path: {SHIPPED}
quantization:
  weight_dtype: int4
  group_size: 32
target:
  runtime: onnxruntime-genai
  device: cpu
eval:
  perplexity:
    dataset: {DATA}
    window: 64
    max_windows: 2
"""


def test_dry_run_prints_estimates_and_a_step_over_the_bound_is_refused_before_work(tmp_path):
    (tmp_path / "r.yaml").write_text(RECIPE)
    plan = engine("apply", "--dry-run", "r.yaml", cwd=tmp_path).stdout
    for kind in ("build", "reference", "eval"):
        line = next(line for line in plan.splitlines() if line.strip().startswith(kind))
        assert "[memory ~" in line and "GB" in line, plan
    refused = engine("apply", "--max-memory", "200M", "r.yaml", cwd=tmp_path, check=1)
    assert "more than the 0.2 GB of --max-memory; nothing was started" in refused.stderr
    assert "build needs ~0.5 GB" in refused.stderr and "--force-memory" in refused.stderr
    assert "Traceback" not in refused.stderr
    store = tmp_path / ".engine"
    assert {p.name for p in store.rglob("*") if p.is_file()} <= {"state.db"}  # planning's stat cache only
    if (tmp_path / "registry.db").exists():
        with sqlite3.connect(tmp_path / "registry.db") as db:
            assert db.execute("select count(*) from variants").fetchone()[0] == 0
    bad = engine("apply", "--max-memory", "lots", "r.yaml", cwd=tmp_path, check=2)
    assert "--max-memory" in bad.stderr


def test_plan_carries_memory_estimate_for_concurrent_admission(tmp_path):
    """issue 13 (--jobs) reads StepPlan.memory_estimate: bytes, on every step whose facts are known."""
    from engine.plan import make_plan
    from engine.recipe import load_recipes
    from engine.store import Store

    (tmp_path / "r.yaml").write_text(RECIPE)
    (recipe,), _ = load_recipes(tmp_path / "r.yaml")
    plan = make_plan(recipe, Store(tmp_path / "store"))
    facts = facts_from_folder(SHIPPED)
    build = plan.build.memory_estimate
    assert isinstance(build, int) and build > 4 * facts.params
    assert all(isinstance(s.memory_estimate, int) for s in plan.steps)


def test_a_refusal_names_the_runtime_whose_build_would_fit(tmp_path):
    """Under a bound between llama.cpp's build estimate (lazy converter) and onnxruntime-genai's (fp32
    builder), the refusal names llama.cpp and itrex (layer-wise RTN); with --force-memory nothing is refused."""
    from engine.admission import MemoryRefused, check_fits
    from engine.plan import make_plan
    from engine.recipe import load_recipes
    from engine.store import Store

    (tmp_path / "r.yaml").write_text(RECIPE)
    (recipe,), _ = load_recipes(tmp_path / "r.yaml")
    plan = make_plan(recipe, Store(tmp_path / "store"))
    facts = facts_from_folder(SHIPPED)
    lazy = get_runtime("llama.cpp").build_memory(facts, {}).anonymous
    assert lazy < plan.build.memory_estimate
    bound = (lazy + plan.build.memory_estimate) // 2
    with pytest.raises(MemoryRefused) as refused:
        check_fits(plan, bound)
    assert "build needs" in refused.value.message and "nothing was started" in refused.value.message
    fits = refused.value.hint.split("a runtime whose build fits: ")[1].split(";")[0]
    assert "llama.cpp (~" in fits and "itrex (~" in fits  # itrex's RTN build runs layer by layer too
    assert "onnxruntime-genai" not in fits
    check_fits(plan, bound, force=True)
