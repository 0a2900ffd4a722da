"""Expand a compressed-tensors checkpoint to a float one, exactly (the source of a `dequantize: true` recipe).

transformers + compressed-tensors load the packed integers and decompress them at the first forward
pass into float weights equal to scale * (q - zero_point); those weights, in a model built from the
same config without `quantization_config`, are saved as an ordinary fp32 checkpoint. Nothing is
rounded again: the float checkpoint computes the same logits as the quantized one (checked here).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from .errors import SourceUnavailable

_KEEP = ("*.jinja", "*.model", "*.tiktoken", "tokenizer*.json", "special_tokens_map.json", "vocab.json",
         "merges.txt", "added_tokens.json")


def dequantize_checkpoint(folder: Path, out: Path) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise SourceUnavailable("dequantizing a compressed-tensors checkpoint needs compressed-tensors",
                                hint="pip install 'engine[transformers]'") from None
    quantized = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map="cpu")
    probe = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    with torch.no_grad():
        expected = quantized(probe).logits  # the first forward decompresses the weights in place
    config = AutoConfig.from_pretrained(folder)
    method = getattr(config, "quantization_config", {}) or {}
    del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {k: v for k, v in quantized.state_dict().items() if k in plain.state_dict()}
    missing = set(plain.state_dict()) - set(state)
    if any(not k.endswith("rotary_emb.inv_freq") for k in missing):
        raise SourceUnavailable(f"dequantizing {folder}: weights not found after decompression: "
                                f"{sorted(missing)[:4]}", hint="only compressed-tensors checkpoints are read")
    plain.load_state_dict(state, strict=False)
    plain.eval()
    with torch.no_grad():
        drift = float((plain(probe).logits - expected).abs().max())
    if drift > 1e-4:
        raise SourceUnavailable(f"dequantizing {folder} changed the model's logits (max |diff| {drift:.3g})")
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    for pattern in _KEEP:
        for path in sorted(Path(folder).glob(pattern)):
            if not (out / path.name).exists():
                shutil.copy2(path, out / path.name)
    return {"dequantized_from": str(folder), "quant_method": method.get("quant_method"),
            "format": method.get("format"), "max_logit_drift": drift}
