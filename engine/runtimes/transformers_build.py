"""The `transformers` build job, run as a child process in the runtime's build environment.

    <build-env>/bin/python -m engine.runtimes.transformers_build JOB.json

The build environment (engine.buildenv) holds llm-compressor 0.14 with the transformers 5.17 and
compressed-tensors 0.19 it requires; torch comes from the engine's environment. The job loads the
source in fp32, runs llm-compressor's `oneshot` with one modifier (GPTQModifier, AWQModifier or
QuantizationModifier for RTN) and saves a Hugging Face checkpoint whose config.json carries the
compressed-tensors `quantization_config` (format pack-quantized: int4/int8 packed into int32, fp32
scales, int zero points for asym). Tokenizer and chat-template files are copied from the source.
Only this module imports llm-compressor; engine.subproc.child_main writes result.json.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from ..subproc import JobError, child_main

_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf)$|\.index\.json$")
_COPY = ("*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt")


def say(message: str) -> None:
    print(f"[transformers] {message}", flush=True)


def scheme_args(job: dict) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs for the weights (pure)."""
    group = job["group_size"]
    args: dict[str, Any] = {"num_bits": job["bits"], "type": "int", "symmetric": job["symmetric"],
                            "strategy": "channel" if group == -1 else "group"}
    if group != -1:
        args["group_size"] = group
    return args


def run(job: dict) -> dict:
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    torch.manual_seed(0)
    source, out = Path(job["source_dir"]), Path(job["out_dir"])
    say(f"loading {source} in fp32")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for entry in job["ignore"]:
        if not any(n == entry or n.startswith(entry + ".") for n in linears):
            shown = ", ".join(linears[:8]) + (" ..." if len(linears) > 8 else "")
            raise JobError(f"quantization.skip_modules: '{entry}' matches no Linear layer of this model",
                           hint=f"Linear layers here: {shown}")
    ignore = sorted({n for n in linears for e in job["ignore"] if n == e or n.startswith(e + ".")})
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(**scheme_args(job)))
    modifier = make_modifier(job["algorithm"], scheme, ignore)
    kwargs: dict[str, Any] = {}
    texts = job.get("calibration_texts") or []
    if job["algorithm"] != "rtn":
        from datasets import Dataset

        encoded = [tokenizer(t, truncation=True, max_length=job["seq_len"]) for t in texts]
        encoded = [e for e in encoded if e["input_ids"]]
        kwargs = {"dataset": Dataset.from_dict({"input_ids": [e["input_ids"] for e in encoded],
                                                "attention_mask": [e["attention_mask"] for e in encoded]}),
                  "num_calibration_samples": len(encoded), "max_seq_length": job["seq_len"]}
        say(f"{job['algorithm']}: calibrating on {len(encoded)} samples of at most {job['seq_len']} tokens")
    t0 = time.perf_counter()
    modifiers = modifier if isinstance(modifier, list) else [modifier]  # AWQ: a smoothing step + quantization
    oneshot(model=model, recipe=modifiers, **kwargs)
    seconds = time.perf_counter() - t0
    model.config.dtype = torch.float32  # the weights that stay float are saved as fp32: load them so
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, save_compressed=True)
    for pattern in _COPY:
        for path in sorted(source.glob(pattern)):
            if not _WEIGHT_FILES.search(path.name) and not (out / path.name).exists():
                shutil.copy2(path, out / path.name)
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    qconfig = config.get("quantization_config") or {}
    say(f"saved {qconfig.get('format')} ({qconfig.get('quant_method')} {qconfig.get('version')}) in {out}")
    from importlib import metadata

    return {"modifier": " + ".join(type(m).__name__ for m in modifiers), "scheme": scheme_args(job), "ignore": ignore,
            "quantization_config": qconfig, "calibration_samples": kwargs.get("num_calibration_samples", 0),
            "quantize_seconds": round(seconds, 3), "build_seconds": round(time.perf_counter() - started, 3),
            "build_versions": {d: metadata.version(d) for d in ("llmcompressor", "compressed-tensors",
                                                               "transformers", "torch")}}


def make_modifier(algorithm: str, scheme: Any, ignore: list[str]) -> Any:
    groups = {"config_groups": {"group_0": scheme}, "ignore": ignore}
    if algorithm == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return GPTQModifier(**groups)
    if algorithm == "awq":
        from llmcompressor.modifiers.awq import AWQModifier

        _cpu_only_cache()

        return AWQModifier(**groups)
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(**groups)


def _cpu_only_cache() -> None:
    """llm-compressor 0.14's AWQ pins its cached activations for faster GPU copies, which raises
    "Cannot access accelerator device" on a machine without one: pinning is only a speed-up, so on
    CPU it is skipped (the values are the same)."""
    import torch

    if torch.accelerator.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


if __name__ == "__main__":
    sys.exit(child_main(run, sys.argv[1:]))
