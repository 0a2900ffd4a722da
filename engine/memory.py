"""Peak memory of each step, estimated before any work from what the checkpoint says about itself.

A big model on a small machine must fail with a message before a step starts, not by the kernel's
OOM killer in the middle of it. The facts come from safetensors headers (8 bytes of length, then
JSON: names, dtypes, shapes; no weights read) or, when the weights are not on this machine yet,
from config.json; the formulas (docs/memory.md) combine them with each runtime's known behaviour
(`Runtime.build_memory`, `Runtime.eval_memory`). An estimate has two parts: `anonymous` memory the
step must own (what has to be free) and `mapped` checkpoint pages, which the kernel can drop
under pressure but which count in the peak resident set (ru_maxrss) a measurement shows.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GB = 10**9
#: a Python process with torch and transformers imported (measured 0.40 GB here), plus slack
TORCH_BASE = int(0.5 * GB)
#: the engine alone (hashing, downloading): a few chunks in flight
ENGINE_BASE = int(0.15 * GB)
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelFacts:
    """What memory depends on, read without loading a weight."""

    params: int  # parameters in total
    stored_bytes: int  # bytes of weights in the checkpoint (bf16: 2 per parameter)
    layer_params: int  # parameters of the largest decoder layer
    outer_params: int  # parameters outside the decoder layers (embeddings, lm_head, final norm)
    hidden_size: int
    vocab_size: int
    layers: int
    read_from: str  # "safetensors headers" | "config.json"
    embed_params: int = 0  # the embedding matrix (the lm_head is as large unless tied)


@dataclass(frozen=True)
class Estimate:
    """A step's peak: memory it must own, plus checkpoint pages it maps (reclaimable, but in its RSS)."""

    anonymous: int
    mapped: int = 0
    note: str = ""

    @property
    def peak_rss(self) -> int:
        return self.anonymous + self.mapped


def gb(n: int | float) -> str:
    return f"{n / GB:.1f} GB" if n >= 0.1 * GB else f"{n / 10**6:.0f} MB"


# -- the facts ------------------------------------------------------------------------------------------
def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of one .safetensors file (its first 8 + n bytes)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > 100 * 10**6:
            raise ValueError(f"{path}: implausible safetensors header length {length}")
        return json.loads(handle.read(length))


def facts_from_folder(folder: Path, config: dict | None = None) -> ModelFacts | None:
    """Facts from a Hugging Face folder's safetensors headers (None when it has none)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    config = config if config is not None else _json(folder / "config.json")
    params = stored = embed = 0
    per_layer: dict[int, int] = {}
    for file in files:
        for name, tensor in safetensors_header(file).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in tensor["shape"]:
                count *= dim
            params += count
            start, end = tensor["data_offsets"]
            stored += end - start
            if name.endswith("embed_tokens.weight"):
                embed = count
            found = _LAYER.search("." + name)
            if found:
                per_layer[int(found.group(1))] = per_layer.get(int(found.group(1)), 0) + count
    layer = max(per_layer.values(), default=0)
    text = _text_config(config or {})
    return ModelFacts(params, stored, layer, params - sum(per_layer.values()), int(text.get("hidden_size") or 0),
                      int(text.get("vocab_size") or 0), len(per_layer), "safetensors headers", embed)


def facts_from_config(config: dict) -> ModelFacts | None:
    """Facts for a llama-like decoder (llama, phi3, mistral, qwen2) from config.json alone: the
    parameter count of its shapes, stored at the config's dtype."""
    text = _text_config(config)
    try:
        h, n, inter = int(text["hidden_size"]), int(text["num_hidden_layers"]), int(text["intermediate_size"])
        heads = int(text["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return None
    vocab = int(text.get("vocab_size") or 32000)
    kv = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or h // heads)
    layer = h * heads * head_dim * 2 + 2 * h * kv * head_dim + 3 * h * inter + 2 * h
    outer = vocab * h * (1 if text.get("tie_word_embeddings") else 2) + h
    params = layer * n + outer
    dtype = str(text.get("torch_dtype") or text.get("dtype") or "float32")
    per = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)
    return ModelFacts(params, params * per, layer, outer, h, vocab, n, "config.json", vocab * h)


def source_facts(source: Any) -> ModelFacts | None:
    """Facts for an engine.sources.Source, without downloading or building anything."""
    folder = source.local_folder()
    config = source.config()
    if folder is not None and folder.is_dir():
        try:
            found = facts_from_folder(folder, config)
        except (OSError, ValueError, KeyError, TypeError, struct.error):  # not a checkpoint we can read:
            found = None  # the build will say so; the estimate falls back to config.json, or unknown
        if found is not None:
            return found
    return facts_from_config(config) if config else None


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# -- the formulas (docs/memory.md) ---------------------------------------------------------------------
def logits_bytes(facts: ModelFacts, window: int) -> int:
    """One window's logits in fp32, with the log-softmax and the scored copy beside them."""
    return 3 * window * max(facts.vocab_size, 1) * 4


def reference_whole(facts: ModelFacts, window: int) -> Estimate:
    """transformers' from_pretrained in fp32: the model (4 bytes a parameter) while the checkpoint
    is mapped, plus one window's logits. Measured 22.5 GB for Phi-3.5-mini's shapes. A checkpoint
    already in fp32 is used where it is mapped (no second copy; measured 0.9 GB for 110 M params)."""
    mapped = 0 if facts.stored_bytes >= 4 * facts.params else facts.stored_bytes
    return Estimate(TORCH_BASE + 4 * facts.params + logits_bytes(facts, window), mapped, "whole model in fp32")


def reference_streamed(facts: ModelFacts, window: int, windows: int) -> Estimate:
    """Layer by layer (engine.streamed): one decoder layer (or the embeddings, or the lm_head) in
    fp32 beside its stored-dtype copy as it is read, the hidden states of every window (and the next
    layer's output), one window's logits. Each tensor's file mapping is closed once it is copied."""
    hidden = 2 * windows * window * max(facts.hidden_size, 1) * 4
    per = facts.stored_bytes / max(facts.params, 1)
    # a layer: fp32 beside its stored copy; the embeddings (and the lm_head): measured 5.63 GB peak at
    # Llama-3-8B's shapes (E = 525 M), about fp32 plus three stored-dtype copies; why three is not
    # understood yet, so the term is fitted to that measurement (it is 38% high at Phi-3.5-mini's)
    resident = int(max((4 + per) * facts.layer_params, (4 + 3 * per) * (facts.embed_params or facts.outer_params)))
    return Estimate(TORCH_BASE + resident + hidden + logits_bytes(facts, window), 0, "streamed, one layer resident")


def default_build(facts: ModelFacts) -> Estimate:
    """A builder that loads the whole model in fp32 and quantizes it in memory."""
    return Estimate(TORCH_BASE + int(4.5 * facts.params), facts.stored_bytes, "whole model in fp32")


def default_eval(facts: ModelFacts, window: int) -> Estimate:
    """A variant is at most as large in memory as the 16-bit source; plus one window's logits."""
    return Estimate(TORCH_BASE + 2 * facts.params + logits_bytes(facts, window), 0, "variant at most 16-bit")


def source_step(facts: ModelFacts | None) -> Estimate:
    """Hashing and downloading read in chunks: the engine and a few buffers."""
    return Estimate(ENGINE_BASE)


# -- the machine ---------------------------------------------------------------------------------------
def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), in bytes."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": GB, "gb": GB, "t": 10**12,
          "tb": 10**12, "kib": 2**10, "ki": 2**10, "mib": 2**20, "mi": 2**20, "gib": 2**30, "gi": 2**30}


def parse_size(text: str) -> int:
    """'12G', '12 GB', '11.5GiB', '800M' -> bytes (G = 10^9, GiB = 2^30). ValueError otherwise."""
    found = _SIZE.match(str(text))
    unit = (found.group(2) or "").lower() if found else None
    if not found or unit not in _UNITS:
        raise ValueError(f"not a size: {text!r} (say 12G, 11.5GiB or 800M)")
    return int(float(found.group(1)) * _UNITS[unit])
