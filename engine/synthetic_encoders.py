"""Tiny seeded non-causal models for the other recipe tasks: a BERT sentence encoder and a T5.

`bert` is a bi-encoder as BGE ships one: BertModel weights, a WordPiece-free byte-level tokenizer
that wraps every text in [CLS] ... [SEP], and a sentence-transformers pooling config (modules.json,
1_Pooling/config.json) saying CLS pooling, so `model.embed` has a real pooling file to read.
`t5` is an encoder-decoder as flan-t5 is one (untied output head, decoder starts at <pad>); its
output head favours printable ASCII so a demo prints visible text. Same spec, same bytes.
torch/transformers/tokenizers are imported inside the functions.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .synthetic import _bytes_to_unicode, _favour_printable

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def build_tokenizer(specials: tuple[str, ...], wrap: tuple[str | None, str]) -> Any:
    """Byte-level BPE without merges: the special tokens first (ids 0..), then one id per byte.

    `wrap` = (token before, token after) every sequence, e.g. ("[CLS]", "[SEP]") or (None, "</s>").
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(specials)}
    for char in _bytes_to_unicode():
        vocab[char] = len(vocab)
    unk = next(t for t in specials if "unk" in t.lower())
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    before, after = wrap
    single = " ".join(x for x in (before and f"{before}:0", "$A:0", f"{after}:0") if x)
    pair = " ".join(x for x in (before and f"{before}:0", "$A:0", f"{after}:0", "$B:1", f"{after}:1") if x)
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, vocab[t]) for t in (before, after) if t])
    return tok


def make_encoder_model(spec: dict[str, Any], out_dir: Path) -> None:
    """Write a bert or t5 folder (config, safetensors, tokenizer; pooling config for bert)."""
    import torch

    out_dir.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG as it was
        torch.manual_seed(int(spec["seed"]))
        if spec["architecture"] == "bert":
            _make_bert(spec, out_dir)
        else:
            _make_t5(spec, out_dir)
    _pin_tokenizer_class(out_dir / "tokenizer_config.json")


def _vocab_size(raw: Any) -> int:
    return -(-raw.get_vocab_size() // 8) * 8  # padded like real checkpoints


def _make_bert(spec: dict[str, Any], out_dir: Path) -> None:
    import torch
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    raw = build_tokenizer(BERT_SPECIALS, ("[CLS]", "[SEP]"))
    config = BertConfig(
        vocab_size=_vocab_size(raw), hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"], max_position_embeddings=spec["max_position_embeddings"],
        pad_token_id=0, type_vocab_size=2,
        initializer_range=0.3,  # BERT's 0.02 makes every random sentence's CLS vector nearly the same
    )
    model = BertModel(config, add_pooling_layer=False).to(torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=spec["max_position_embeddings"], clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)
    write_pooling(out_dir, spec["hidden_size"], "cls")


def write_pooling(folder: Path, dim: int, mode: str) -> None:
    """sentence-transformers' modules.json + 1_Pooling/config.json (Transformer -> Pooling -> Normalize)."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (folder / "modules.json").write_text(json.dumps(modules, indent=2) + "\n", encoding="utf-8")
    (folder / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": dim, "pooling_mode_cls_token": mode == "cls",
               "pooling_mode_mean_tokens": mode == "mean", "pooling_mode_max_tokens": False,
               "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True}
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n", encoding="utf-8")


def _make_t5(spec: dict[str, Any], out_dir: Path) -> None:
    from transformers import GenerationConfig, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    raw = build_tokenizer(T5_SPECIALS, (None, "</s>"))
    vocab_size = _vocab_size(raw)
    config = T5Config(
        vocab_size=vocab_size, d_model=spec["hidden_size"], d_ff=spec["intermediate_size"],
        d_kv=spec["hidden_size"] // spec["num_attention_heads"], num_layers=spec["num_hidden_layers"],
        num_decoder_layers=spec["num_hidden_layers"], num_heads=spec["num_attention_heads"],
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0, n_positions=spec["max_position_embeddings"],
    )
    model = T5ForConditionalGeneration(config)
    _favour_printable(model, raw, vocab_size)
    model.generation_config = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=spec["max_position_embeddings"], clean_up_tokenization_spaces=False,
    )
    tokenizer.save_pretrained(out_dir)


def _pin_tokenizer_class(path: Path) -> None:
    """Readable by transformers 4.x too (5.x writes TokenizersBackend)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data.pop("extra_special_tokens", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
