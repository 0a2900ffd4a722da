"""What each weight really became, read from the built artifact, summarised per module kind.

Two variants that both say `int4` may differ where it matters (onnxruntime-genai quantizes lm_head to
int4, NNCF keeps it in int8, INC in fp32): each runtime reads its own artifact
(`Runtime.weight_precisions`: the ONNX graph, the OpenVINO IR, INC's packed modules) into
`WeightPrecision` rows, and `summarize` groups them by kind (attention, mlp, embeddings, lm_head,
other) so `engine show` and `engine diff` compare them at a glance. Standard library only.
"""
from __future__ import annotations

import re
from typing import NamedTuple

KINDS = ("attention", "mlp", "embeddings", "lm_head", "other")

_KIND_PATTERNS = (
    ("lm_head", re.compile(r"lm_head|output_layer|embed_out")),
    ("embeddings", re.compile(r"embed")),
    ("attention", re.compile(r"attn|attention|[qkvo]_proj|qkv|query|key|value|dense_heads")),
    ("mlp", re.compile(r"mlp|ffn|feed_forward|gate|up_proj|down_proj|fc\d|dense_h_to|dense_4h|w[123]\b")),
)


class WeightPrecision(NamedTuple):
    """One weight tensor as stored: its name, its precision (int4, int8, nf4, fp16, fp32, ...) and
    the quantization block (group) size; None for per-channel or unquantized."""

    name: str
    precision: str
    block: int | None = None


def kind_of(name: str) -> str:
    """attention, mlp, embeddings, lm_head or other, from a tensor's or node's name."""
    lowered = name.lower()
    for kind, pattern in _KIND_PATTERNS:
        if pattern.search(lowered):
            return kind
    return "other"


def label(weight: WeightPrecision) -> str:
    """'int4 g32', 'int8 per-channel', 'fp32'."""
    if weight.precision in ("fp32", "fp16", "bf16"):
        return weight.precision
    return f"{weight.precision} g{weight.block}" if weight.block else f"{weight.precision} per-channel"


def summarize(weights: list[WeightPrecision]) -> dict[str, dict[str, int]]:
    """kind -> {label: number of weight tensors}, kinds in KINDS order, labels sorted."""
    out: dict[str, dict[str, int]] = {}
    for weight in weights:
        counts = out.setdefault(kind_of(weight.name), {})
        counts[label(weight)] = counts.get(label(weight), 0) + 1
    return {kind: dict(sorted(out[kind].items())) for kind in KINDS if kind in out}


def describe(summary: dict[str, dict[str, int]], kind: str) -> str:
    """'int4 g32 x18' or 'int4 g32 x17, int8 per-channel x1' for one kind; '-' when absent."""
    counts = summary.get(kind) or {}
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "-"
