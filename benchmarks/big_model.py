"""Big models on this machine: memory estimates next to measurements, at real shapes.

Writes a random checkpoint with the exact shapes of a real model (seeded, bf16, sharded safetensors,
a SentencePiece tokenizer borrowed from ../shared when present, else the synthetic byte-level one),
cached under --dir, then measures what each step costs through the engine itself:

  - the first source digest (wall time, GB/s), and a second plan (stat-cached digest);
  - `engine apply --dry-run`: every step's estimate, per runtime;
  - `engine apply` per runtime: refused before any work when a step cannot fit (the message), else
    wall time and peak RSS of the engine and its children (resource.getrusage), then a cached apply;
  - the source reference pass, streamed (engine.streamed) in a child: wall time and peak RSS.

Not a test. Usage (runs needing more than ~6 GB RAM belong under `flock -x /tmp/heavy.lock`):
  python benchmarks/big_model.py --shape phi-3.5-mini --dir /tmp/wt12-big [--runtime llama.cpp] [--clean]
  python benchmarks/big_model.py --shape llama-3-8b --estimates-only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "data" / "models" / "wt2-llama-sp"
DATA = ROOT / "data" / "wikitext-2" / "wiki.test.head.raw"
SHAPES = {
    "phi-3.5-mini": {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072,
                     "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 4096,
                     "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16"},
    "llama-3-8b": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                   "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
                   "torch_dtype": "bfloat16"},
}
SHARD_BYTES = 2 * 10**9
EVAL = {"perplexity": {"dataset": str(DATA), "window": 128, "max_windows": 2}, "speed": {"enabled": False}}


def shape_config(shape: str, layers: int | None = None) -> dict:
    """The shape's config; `layers` keeps its widths with fewer (or more) decoder layers, for measuring
    how a build's peak grows with the parameter count at sizes that fit beside other work."""
    spec = dict(SHAPES[shape])
    if layers:
        spec["num_hidden_layers"] = layers
    return spec


def write_checkpoint(shape: str, folder: Path, seed: int = 0, layers: int | None = None) -> Path:
    """The random checkpoint (once: a folder with config.json is reused)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {k: v for k, v in shape_config(shape, layers).items() if k != "torch_dtype"}
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shard: dict = {}
    index: dict[str, str] = {}
    size = shards = 0

    def flush() -> None:
        nonlocal shard, size, shards
        if shard:
            shards += 1
            name = f"model-{shards:05d}.safetensors"
            save_file(shard, str(partial / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    for name, tensor in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            value = torch.ones(tensor.shape, dtype=torch.bfloat16)
        else:
            value = (torch.randn(tensor.shape, generator=generator) * 0.02).to(torch.bfloat16)
        shard[name] = value
        size += value.numel() * 2
        if size >= SHARD_BYTES:
            flush()
    flush()
    (partial / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    config.save_pretrained(partial)
    _tokenizer(partial)
    partial.rename(folder)
    return folder


def _tokenizer(folder: Path) -> None:
    """A SentencePiece tokenizer (llama.cpp's converters want one; they pad the vocabulary)."""
    if SHARED_TOKENIZER.is_dir():
        for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(SHARED_TOKENIZER / name, folder / name)
        return
    from engine.synthetic import build_tokenizer

    build_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def engine_cli(args: list[str], cwd: Path, env: dict | None = None) -> tuple[float, int, str]:
    """(seconds, peak RSS of the engine and its children in bytes, stdout+stderr) of one CLI run in a
    fresh process whose own getrusage(RUSAGE_CHILDREN) covers everything it started."""
    code = textwrap.dedent("""
        import json, resource, subprocess, sys, time
        t = time.perf_counter()
        p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
        seconds = time.perf_counter() - t
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(json.dumps([seconds, peak, p.returncode, p.stdout + p.stderr]))
    """)
    done = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "engine", *args], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds, peak, code_, text = json.loads(done.stdout.splitlines()[-1])
    return seconds, peak, f"[exit {code_}]\n{text}"


def recipe(work: Path, model: Path, runtime: str) -> Path:
    quant = {"llama.cpp": "target:\n  runtime: llama.cpp\n  options: {ftype: Q4_K_M}\n"}.get(
        runtime, f"quantization: {{weight_dtype: int4, group_size: 32}}\ntarget: {{runtime: {runtime}}}\n")
    path = work / f"{runtime}.yaml"
    path.write_text(f"name: big-{runtime.replace('.', '')}\nsource: {{path: {model}}}\n{quant}"
                    f"eval: {json.dumps(EVAL)}\n")
    return path


def streamed_reference(model: Path, out: Path) -> tuple[float, int, float]:
    code = textwrap.dedent(f"""
        import json, resource, time
        from pathlib import Path
        from engine.evaluation import compute_reference
        spec = {{"perplexity": {{"window": 128, "stride": 128, "max_windows": 2, "bos": False,
                                "_files": [{str(DATA)!r}], "_hub": None}}}}
        t = time.perf_counter()
        meta = compute_reference(Path({str(model)!r}), spec, Path({str(out)!r}), lambda m: None, streamed=True)
        print(json.dumps([time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                          meta["source_perplexity"]]))
    """)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return tuple(json.loads(done.stdout.splitlines()[-1]))


#: int4 group 32 build params (the default estimate, without params, is the larger int8 one)
LOW_BIT_PARAMS = {"openvino": {"precision": "int4", "config": {"group_size": 32}},
                  "onnxruntime-genai": {"precision": "int4"}}


def estimates(shape: str, layers: int | None = None) -> None:
    """Every runtime's estimates for the shape, from its config alone (nothing written)."""
    from engine import memory
    from engine.discovery import get_runtime, runtime_names

    facts = memory.facts_from_config(shape_config(shape, layers))
    print(f"{shape}: {facts.params / 1e9:.2f} B params, {memory.gb(facts.stored_bytes)} in bf16")
    print(f"  reference whole : {memory.gb(memory.reference_whole(facts, 128).anonymous)}")
    print(f"  reference stream: {memory.gb(memory.reference_streamed(facts, 128, 2).anonymous)}")
    for name in runtime_names():
        built = get_runtime(name).build_memory(facts, {})
        print(f"  build {name:<18}: {memory.gb(built.anonymous)} (+{memory.gb(built.mapped)} mapped)  {built.note}")
    for name, params in LOW_BIT_PARAMS.items():  # the builds whose formula depends on the precision
        built = get_runtime(name).build_memory(facts, params)
        print(f"  build {name + ' int4':<18}: {memory.gb(built.anonymous)} (+{memory.gb(built.mapped)} mapped)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="phi-3.5-mini")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/wt12-big"))
    parser.add_argument("--layers", type=int, default=None,
                        help="the shape's widths with this many decoder layers (folder SHAPE-Kl)")
    parser.add_argument("--runtime", action="append", help="runtimes to apply (default: onnxruntime-genai)")
    parser.add_argument("--estimates-only", action="store_true", help="print estimates from the config only")
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint and store afterwards")
    parser.add_argument("--max-memory", default="6G",
                        help="engine apply --max-memory (default 6G: a shared machine)")
    parser.add_argument("--make-only", action="store_true", help="only write the checkpoint")
    parser.add_argument("--reference-only", action="store_true", help="only the streamed reference pass")
    args = parser.parse_args()
    estimates(args.shape, args.layers)
    if args.estimates_only:
        return
    model = args.dir / (f"{args.shape}-{args.layers}l" if args.layers else args.shape)
    t = time.perf_counter()
    write_checkpoint(args.shape, model, layers=args.layers)
    print(f"checkpoint: {model} ({time.perf_counter() - t:.0f} s to make or find)")
    if args.make_only:
        return
    work = args.dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    for runtime in [] if args.reference_only else args.runtime or ["onnxruntime-genai"]:
        path = recipe(work, model, runtime)
        seconds, peak, text = engine_cli(["apply", "--dry-run", path.name], work)
        print(f"\n== {runtime}: first plan (digest of {size / 1e9:.1f} GB): {seconds:.1f} s, "
              f"{size / 1e9 / seconds:.2f} GB/s, peak RSS {peak / 1e9:.2f} GB\n{text}")
        seconds, peak, _ = engine_cli(["apply", "--dry-run", path.name], work)
        print(f"   second plan (stat-cached digest): {seconds:.2f} s")
        seconds, peak, text = engine_cli(["apply", "--max-memory", args.max_memory, path.name], work)
        print(f"   apply (--max-memory {args.max_memory}): {seconds:.1f} s, "
              f"peak RSS (engine and children) {peak / 1e9:.2f} GB\n{text}")
        if "[exit 0]" in text:
            seconds, peak, text = engine_cli(["apply", "--max-memory", args.max_memory, path.name], work)
            print(f"   cached apply: {seconds:.2f} s\n{text}")
    seconds, peak, ppl = streamed_reference(model, args.dir / "reference")
    print(f"\n== streamed reference pass (2 windows of 128): {seconds:.1f} s, peak RSS {peak / 1e9:.2f} GB, "
          f"perplexity {ppl:.1f}")
    print(f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    if args.clean:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
