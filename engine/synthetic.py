"""A tiny seeded model with a byte-level tokenizer, made offline in a few seconds.

Causal LMs (phi3, llama), a BERT-style sentence encoder (bert: with a sentence-transformers
pooling config, CLS as BGE) and a T5-style encoder-decoder (t5) for the non-causal tasks.

Demos and tests need a real Hugging Face model folder without any download; the same spec and
library versions give the same bytes, so the folder can be cached by its identity.
torch/transformers/tokenizers are imported inside the functions: importing this module is free.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Bump when the code below changes the bytes it writes: it is part of the source identity.
GENERATOR_VERSION = 2  # 2: output head favours printable ASCII

SYNTHETIC_DEFAULTS: dict[str, Any] = {
    "architecture": "phi3",
    "seed": 0,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 256,
}
ARCHITECTURES = ("phi3", "llama", "bert", "t5")
#: architecture -> the recipe task its models serve
TASK_OF = {"phi3": "text-generation", "llama": "text-generation", "bert": "feature-extraction",
           "t5": "text2text-generation"}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def with_defaults(spec: dict[str, Any] | None) -> dict[str, Any]:
    """The spec with every default filled in (the part of the identity that is the user's)."""
    full = dict(SYNTHETIC_DEFAULTS)
    full.update(spec or {})
    if full["architecture"] not in ARCHITECTURES:
        raise ValueError(f"unknown synthetic architecture {full['architecture']!r}")
    if full["hidden_size"] % full["num_attention_heads"]:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    return full


def _bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255, in byte order (the ByteLevel alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars: dict[int, int] = {b: b for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return [chr(chars[b]) for b in range(256)]


def build_tokenizer() -> Any:
    """Byte-level BPE without merges: ids 0..255 are bytes, then the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: i for i, char in enumerate(_bytes_to_unicode())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def _config(spec: dict[str, Any], vocab_size: int, ids: dict[str, int]) -> Any:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_attention_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        bos_token_id=ids["<s>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["</s>"],
        tie_word_embeddings=False,
    )
    if spec["architecture"] == "phi3":
        from transformers import Phi3Config

        return Phi3Config(
            **common,
            original_max_position_embeddings=spec["max_position_embeddings"],
            sliding_window=None,
            rope_scaling=None,
        )
    from transformers import LlamaConfig

    return LlamaConfig(**common)


def make_synthetic_model(spec: dict[str, Any], out_dir: Path) -> None:
    """Write config, float32 safetensors weights, generation config and tokenizer to ``out_dir``."""
    from .quiet import quiet_transformers

    quiet_transformers()
    if with_defaults(spec)["architecture"] in ("bert", "t5"):
        from .synthetic_encoders import make_encoder_model

        make_encoder_model(with_defaults(spec), Path(out_dir))
        return
    import torch
    from transformers import (
        AutoModelForCausalLM,
        GenerationConfig,
        PreTrainedTokenizerFast,
    )

    spec = with_defaults(spec)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    raw = build_tokenizer()
    ids = {t: raw.token_to_id(t) for t in SPECIAL_TOKENS}
    vocab_size = -(-raw.get_vocab_size() // 8) * 8  # padded like real checkpoints
    config = _config(spec, vocab_size, ids)

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(int(spec["seed"]))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _favour_printable(model, raw, vocab_size)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<s>"],
        eos_token_id=[ids["</s>"], ids["<|end|>"]],
        pad_token_id=ids["</s>"],
    )
    model.save_pretrained(out_dir, safe_serialization=True)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=spec["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)
    _pin_tokenizer_class(out_dir / "tokenizer_config.json")


def _favour_printable(model: Any, raw: Any, vocab_size: int) -> None:
    """Zero the output rows of every token but printable ASCII bytes.

    Random logits of printable tokens then beat the zero logits of the rest (their maximum over
    ~95 tokens is positive), so a demo prints visible characters instead of broken UTF-8, and
    greedy decoding runs to max_new_tokens instead of stopping at a random EOS.
    """
    import torch

    keep = torch.zeros(vocab_size, dtype=torch.bool)
    for token_id in range(raw.get_vocab_size()):
        text = raw.decode([token_id], skip_special_tokens=False)
        keep[token_id] = len(text) == 1 and 32 <= ord(text) <= 126
    with torch.no_grad():
        model.get_output_embeddings().weight[~keep] = 0.0


def _pin_tokenizer_class(path: Path) -> None:
    """Make tokenizer_config.json readable by transformers 4.x and other tools, not only 5.x.

    transformers 5 writes ``TokenizersBackend`` and a list under ``extra_special_tokens`` (4.x
    wants a dict there) and keeps the chat template only in chat_template.jinja.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    extra = data.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        data["additional_special_tokens"] = extra
    elif extra:
        data["extra_special_tokens"] = extra
    data["chat_template"] = CHAT_TEMPLATE
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
