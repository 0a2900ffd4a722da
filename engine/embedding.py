"""Sentence embeddings: the model object of a `feature-extraction` variant, written once for every runtime.

A runtime supplies one primitive, the encoder's token states for a padded batch; pooling (read from
the model folder's sentence-transformers config: CLS for BGE, mean otherwise), the query
instruction, batching, normalization and the (0, dim) answer to an empty list are done here, so
every runtime embeds the same way. numpy is the only import at call time; torch stays in runtimes.
"""
from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import EngineError
from .runtime import Model, Sampling
from .tasks import wrong_task

POOLING_MODES = ("cls", "mean", "max", "lasttoken")
#: the tasks whose variants generate text (what a wrong call on an embedder is pointed to)
GENERATING = "text-generation or text2text-generation"
#: the longest input embedded (BERT-style encoders have 512 positions)
MAX_TOKENS = 512


def read_pooling(folder: Path) -> tuple[str, str]:
    """(mode, where it came from) from modules.json -> <Pooling path>/config.json.

    Without a sentence-transformers config the mode is mean, and the second value says so.
    """
    modules_file = folder / "modules.json"
    pooling_dir = folder / "1_Pooling"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
            pooling_dir = next((folder / m["path"] for m in modules if m.get("type", "").endswith("Pooling")),
                               pooling_dir)
        except (ValueError, TypeError, KeyError) as error:
            raise EngineError(f"{modules_file}: not a sentence-transformers modules.json ({error})") from None
    config_file = pooling_dir / "config.json"
    if not config_file.is_file():
        return "mean", "no sentence-transformers pooling config (1_Pooling/config.json) in the model: mean pooling"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for mode in POOLING_MODES:
        if config.get(f"pooling_mode_{mode}_token") or config.get(f"pooling_mode_{mode}_tokens") \
                or config.get(f"pooling_mode_{mode}"):
            return mode, f"{config_file.relative_to(folder)}: {mode}"
    raise EngineError(f"{config_file}: no pooling mode the engine knows is set (known: {', '.join(POOLING_MODES)})")


def pool(states: Any, mask: Any, mode: str) -> Any:
    """[batch, seq, dim] token states -> [batch, dim] float32, padding masked out."""
    import numpy as np

    states = np.asarray(states, dtype=np.float32)
    mask = np.asarray(mask, dtype=np.float32)[:, :, None]
    if mode == "cls":
        return states[:, 0]
    if mode == "max":
        return np.where(mask > 0, states, -np.inf).max(axis=1)
    if mode == "lasttoken":
        last = mask[:, :, 0].sum(axis=1).astype(int) - 1
        return states[np.arange(states.shape[0]), last]
    return (states * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)


class EmbeddingModel(Model):
    """What engine.load returns for a feature-extraction variant: `embed`, and no generation."""

    def __init__(self, info: Any, native: Any, tokenizer: Any) -> None:
        super().__init__(info, native)
        self.tokenizer = tokenizer
        folder = Path(info.artifact_dir) if info.artifact_dir else None
        self.pooling, self.pooling_source = read_pooling(folder) if folder else ("mean", "no model folder: mean")

    # -- the one primitive a runtime implements ----------------------------------------------------
    @abstractmethod
    def token_states(self, input_ids: Any, attention_mask: Any) -> Any:
        """The encoder's last hidden states [batch, seq, dim] for int64 numpy inputs [batch, seq]."""

    @property
    def dim(self) -> int:
        config = getattr(self.native, "config", None)
        return int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0))

    def embed(self, texts: list[str], batch_size: int = 32, normalize: bool = True,
              instruction: str | None = None) -> Any:
        """float32 numpy [len(texts), dim]: one pooled vector per text (`instruction` is prefixed to
        each text, as BGE wants for queries); unit length unless normalize=False."""
        import numpy as np

        if isinstance(texts, str):
            raise EngineError("embed() takes a list of texts", hint="wrap one text in a list: embed([text])")
        if batch_size < 1:
            raise EngineError(f"batch_size must be a positive integer, got {batch_size!r}")
        prefixed = [f"{instruction}{t}" if instruction else t for t in texts]
        parts = [self._embed_batch(prefixed[i:i + batch_size]) for i in range(0, len(prefixed), batch_size)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.dim), dtype=np.float32)
        if normalize and len(vectors):
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32, copy=False)

    def _embed_batch(self, texts: list[str]) -> Any:
        limit = min(int(getattr(self.tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS), MAX_TOKENS)
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=limit, return_tensors="np")
        mask = batch["attention_mask"].astype("int64")
        return pool(self.token_states(batch["input_ids"].astype("int64"), mask), mask, self.pooling)

    # -- what an embedder does not do ------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        raise wrong_task(self, GENERATING, "generate")

    def generate(self, prompt: Any, *args: Any, **kwargs: Any) -> Any:
        raise wrong_task(self, GENERATING, "generate")

    def stream(self, prompt: Any, *args: Any, **kwargs: Any) -> Iterator[str]:
        raise wrong_task(self, GENERATING, "stream")

    def chat(self, messages: list[dict], *args: Any, **kwargs: Any) -> Any:
        raise wrong_task(self, GENERATING, "chat")

    def logits(self, ids: list[int]) -> Any:
        raise wrong_task(self, "text-generation", "return next-token logits")


class TorchEmbedder(EmbeddingModel):
    """A PyTorch encoder (a transformers AutoModel, quantized or not): its last_hidden_state."""

    def token_states(self, input_ids: Any, attention_mask: Any) -> Any:
        import torch

        with torch.no_grad():
            out = self.native(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
        return out.last_hidden_state.float().numpy()
