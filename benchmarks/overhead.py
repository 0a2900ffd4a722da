"""Engine overhead against the backend called directly, measured in one run (ratios, not absolutes).

    python benchmarks/overhead.py [MODEL_DIR]     # default: models/wt2-phi3-7m (ships with the repository)

Prints, for onnxruntime-genai int4: build through `engine apply` vs the builder run by hand,
decode tokens/s through engine.load(...).generate vs onnxruntime_genai's own loop, and the wall
time of a fully cached `engine apply` (which must not import torch or onnxruntime).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "models" / "wt2-phi3-7m"
PROMPT, NEW = "The history of the", 128


def timed(cmd: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def direct_decode(folder: Path) -> float:
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tok = og.Tokenizer(model)
    ids = tok.encode(PROMPT)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    started, n = time.perf_counter(), 0
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    return n / (time.perf_counter() - started)


def engine_decode(work: Path) -> float:
    import engine

    model = engine.load("bench", registry=work / "registry.db")
    text = model.generate(PROMPT, max_new_tokens=NEW)
    return text.new_tokens / text.seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "bench.yaml").write_text(
            f"name: bench\nsource: {{path: {MODEL}}}\nquantization: {{weight_dtype: int4, group_size: 32}}\n"
            "target: {runtime: onnxruntime-genai}\n")
        engine_build = timed([sys.executable, "-m", "engine", "apply", "bench.yaml"], work)
        direct_build = timed([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(MODEL), "-o",
                              str(work / "direct"), "-p", "int4", "-e", "cpu", "-c", str(work / "cache"),
                              "--extra_options", "block_size=32", "is_symmetric=true", "accuracy_level=1",
                              "hf_token=false"], work)
        cached = min(timed([sys.executable, "-m", "engine", "apply", "bench.yaml"], work) for _ in range(3))
        direct = direct_decode(work / "direct")
        via_engine = engine_decode(work)
        print(f"model: {MODEL}")
        print(f"build   engine {engine_build:.1f} s / direct {direct_build:.1f} s = {engine_build / direct_build:.2f}x")
        print(f"decode  engine {via_engine:.0f} tok/s / direct {direct:.0f} tok/s = {via_engine / direct:.2f}x")
        print(f"cached apply (best of 3, whole process): {cached:.2f} s")


if __name__ == "__main__":
    main()
