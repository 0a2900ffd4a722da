"""Sources whose weights are already quantized: detected, recorded, and never quantized again silently.

A Hugging Face checkpoint says it is quantized in config.json's `quantization_config` (GPTQ from
auto-gptq / GPTQModel: quant_method gptq; AWQ from AutoAWQ: awq; llm-compressor: compressed-tensors).
What the runtimes here can do with one, read from their sources at the pinned versions:
- onnxruntime-genai 0.18's model builder converts gptq, awq, quark, olive and quant_auto checkpoints to
  MatMulNBits without re-quantizing, but refuses compressed-tensors (and modelopt) on any EP but CUDA;
- optimum-intel 2.2 loads gptq / awq checkpoints only through GPTQModel / AutoAWQ (not installed here)
  and would then compress the float weights with NNCF again;
- itrex, llama.cpp and transformers read float checkpoints and quantize them.
No runtime here reads such a checkpoint as it is on CPU, so a recipe on a quantized source is refused,
saying so, unless its source asks for `dequantize: true` (a compressed-tensors checkpoint expanded to
float exactly, engine.dequantize): re-quantizing is then what the recipe says, not a surprise.
"""
from __future__ import annotations

from typing import Any

#: quant_method -> who writes it (for messages)
WRITERS = {"gptq": "auto-gptq / GPTQModel", "awq": "AutoAWQ", "compressed-tensors": "llm-compressor",
           "bitsandbytes": "bitsandbytes", "fp8": "fp8", "quark": "AMD Quark", "modelopt": "NVIDIA ModelOpt"}


def quantization_of(config: dict | None) -> dict | None:
    """A short description of a checkpoint's quantization_config, or None for a float checkpoint."""
    qc = (config or {}).get("quantization_config")
    if not isinstance(qc, dict):
        return None
    method = str(qc.get("quant_method") or "unknown")
    weights = next(iter((qc.get("config_groups") or {}).values()), {}) or {}
    weights = weights.get("weights") or {}
    return {"quant_method": method, "format": qc.get("format"),
            "bits": weights.get("num_bits") or qc.get("bits") or qc.get("w_bit"),
            "group_size": weights.get("group_size") or qc.get("group_size") or qc.get("q_group_size")}


def describe(q: dict) -> str:
    bits = f"int{q['bits']}" if q.get("bits") else "quantized"
    group = f" g{q['group_size']}" if q.get("group_size") else ""
    fmt = f", format {q['format']}" if q.get("format") else ""
    return f"{q['quant_method']} ({WRITERS.get(q['quant_method'], 'unknown writer')}{fmt}), {bits}{group}"


def source_issues(recipe: Any, runtime: Any, source: Any) -> list:
    """RecipeIssues for a source this recipe cannot build from as written (engine.plan calls this)."""
    issues = []
    if source.kind == "variant":
        parent = source.resolve()
        names = [ref.split("@")[0] for ref in source.lineage if " " not in ref]
        if recipe.name in names:
            chain = " -> ".join([recipe.name, *source.lineage])
            issues.append(recipe.issue(("source", "variant"), f"a cycle: {chain}",
                                       "a variant cannot be built from itself or from a variant made from it; "
                                       "name an unquantized checkpoint or another variant"))
            return issues
        if source.format != "hf":
            issues.append(recipe.issue(("source", "variant"), f"variant {parent.ref} was built by runtime "
                                       f"{parent.runtime}: its artifact is not a Hugging Face checkpoint another "
                                       "runtime can build from", "use a variant of runtime transformers "
                                       "(a compressed-tensors checkpoint), or the unquantized source itself"))
            return issues
    dequantize = bool(source.spec.get("dequantize"))
    if dequantize and source.kind != "variant":
        issues.append(recipe.issue(("source", "dequantize"), "dequantize applies to `source.variant` only",
                                   "register the checkpoint as a variant of runtime transformers first, or remove "
                                   "dequantize"))
        return issues
    q = quantization_of(source.config())
    if q is None:
        if dequantize:
            issues.append(recipe.issue(("source", "dequantize"), "the source is not quantized: nothing to dequantize",
                                       "remove `dequantize: true`"))
        return issues
    if dequantize:
        if q["quant_method"] != "compressed-tensors":
            issues.append(recipe.issue(("source", "dequantize"), f"only compressed-tensors checkpoints can be "
                                       f"dequantized here; this one is {describe(q)}", "build from the float "
                                       "checkpoint instead"))
        return issues
    where = ("source", "variant") if source.kind == "variant" else ("source",)
    hint = ("write `dequantize: true` under source to expand the weights to float exactly and quantize them again "
            "on purpose, or build from the unquantized checkpoint"
            if q["quant_method"] == "compressed-tensors" and source.kind == "variant"
            else "build from the unquantized checkpoint: no runtime here reads this format as it is on CPU "
                 "(onnxruntime-genai's builder reads gptq/awq, but through the engine only float sources are wired)")
    issues.append(recipe.issue(where, f"the source is already quantized: {describe(q)}; runtime {runtime.name} "
                               "would quantize its weights again", hint))
    return issues
