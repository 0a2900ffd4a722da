"""The source model's fp32 forward pass, one decoder layer at a time, for models that do not fit.

The whole-model reference pass holds the model in fp32 (4 bytes a parameter: 15 GB for a 3.8 B
model, 32 GB for 8 B). This pass computes the same function in the same order of operations: the
model's skeleton is made on the `meta` device (no memory), then the embeddings, each decoder layer,
the final norm and the lm_head are in turn given their weights from the memory-mapped safetensors
(upcast to fp32), applied to the hidden states of every window (kept between layers), and sent
back to `meta`. Its peak is one layer plus the embeddings plus the windows' hidden states
(engine.memory.reference_streamed). Supports the llama-like decoders we ship (llama, phi3).
Heavy imports (torch, transformers, safetensors) happen inside the functions.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "phi3")


def supports(config: dict | None) -> bool:
    """Whether this pass knows the model's layout (a llama-like decoder with model.layers)."""
    return bool(config) and config.get("model_type") in ARCHITECTURES


class Checkpoint:
    """Tensor name -> safetensors file, read one tensor at a time from the mapped files."""

    def __init__(self, folder: Path) -> None:
        from .memory import safetensors_header

        self.folder = folder
        self.where: dict[str, str] = {}
        for file in sorted(folder.glob("*.safetensors")):
            for name in safetensors_header(file):
                if name != "__metadata__":
                    self.where[name] = file.name

    def tensor(self, name: str) -> Any:
        """One tensor, copied out of its file's mapping; the mapping is closed again at once, so the
        pages of layers already done do not stay in this process's resident set."""
        from safetensors import safe_open

        with safe_open(str(self.folder / self.where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def load(self, module: Any, prefix: str) -> Any:
        """Give `module` (on meta) real fp32 weights from the tensors named `prefix` + its keys."""
        import torch

        state = {}
        for key in module.state_dict():
            name = prefix + key
            if name not in self.where:
                raise KeyError(f"the checkpoint has no tensor {name}")
            state[key] = self.tensor(name).to(torch.float32)
        module.load_state_dict(state, assign=True)  # the tensors become the parameters: no second copy
        return module


def windows_logits(source_dir: Path, windows: list[list[int]], progress: Callable[[str], None]) -> Iterator[Any]:
    """fp32 logits (a [len, vocab] numpy array) of each window, in order, computed layer by layer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    from .progress import task

    config = AutoConfig.from_pretrained(source_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    skeleton.eval()
    body = skeleton.model
    ckpt = Checkpoint(Path(source_dir))
    rotary = type(body.rotary_emb)(config=skeleton.config)  # computed buffers, made for real
    positions = [torch.arange(len(ids)).unsqueeze(0) for ids in windows]
    with torch.no_grad():
        embed = ckpt.load(body.embed_tokens, "model.embed_tokens.")
        hidden = [embed(torch.tensor([ids])) for ids in windows]
        embed.to("meta")
        make_mask = (create_causal_mask if getattr(skeleton.config, "sliding_window", None) is None
                     else create_sliding_window_causal_mask)
        masks = [make_mask(config=skeleton.config, inputs_embeds=h, attention_mask=None, past_key_values=None,
                           position_ids=p) for h, p in zip(hidden, positions)]
        rope = [rotary(h, position_ids=p) for h, p in zip(hidden, positions)]
        layers = body.layers[: skeleton.config.num_hidden_layers]
        with task("reference: layers (streamed)", len(layers), "layers") as done:
            for i, layer in enumerate(layers):
                ckpt.load(layer, f"model.layers.{i}.")
                hidden = [layer(h, attention_mask=m, position_ids=p, past_key_values=None, use_cache=False,
                                position_embeddings=r) for h, m, p, r in zip(hidden, masks, positions, rope)]
                layer.to("meta")
                done.advance()
        norm = ckpt.load(body.norm, "model.norm.")
        hidden = [norm(h) for h in hidden]
        head_name = "lm_head.weight" if "lm_head.weight" in ckpt.where else "model.embed_tokens.weight"
        head = ckpt.load(skeleton.lm_head, "lm_head.") if head_name == "lm_head.weight" else _tied_head(skeleton, ckpt)
        for h in hidden:
            yield head(h)[0].float().numpy()
        head.to("meta")


def _tied_head(skeleton: Any, ckpt: Checkpoint) -> Any:
    import torch

    head = skeleton.lm_head
    head.load_state_dict({"weight": ckpt.tensor("model.embed_tokens.weight").to(torch.float32)}, assign=True)
    return head


def model_type(source_dir: Path) -> str | None:
    try:
        return json.loads((Path(source_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
