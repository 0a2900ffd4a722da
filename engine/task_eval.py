"""Scores for the tasks beyond causal LMs, recorded like perplexity and KL (engine/evaluation.py).

feature-extraction (`eval.embeddings`): queries and passages are cut from a local text file (each
passage a line of at least 40 characters, each query the first 8 words of every k-th passage, the
passage then keeps the rest); the source model (PyTorch fp32, the same pooling) and the variant
embed the same texts. Scores: mean and minimum cosine similarity between the two embeddings of each
text, top-k retrieval agreement (the share of the source's k nearest passages per query the variant
also ranks in its k nearest), sentences/s of the variant (batch 32).
text2text-generation (`eval.text2text`): (input, target) pairs, one per line `input<TAB>target`;
the decoder's next-token distributions with teacher forcing on the target: KL(source || variant),
top-1 agreement, and the target perplexity of both.
torch/transformers are imported inside the functions.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EngineError

Progress = Callable[[str], None]
QUERY_WORDS = 8
MIN_PASSAGE_CHARS = 40


def read_corpus(files: list[str], queries: int, passages: int) -> tuple[list[str], list[str]]:
    """(queries, passages) from local text files, deterministic (see the module docstring)."""
    lines = [" ".join(line.split()) for f in files for line in Path(f).read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if len(line) >= MIN_PASSAGE_CHARS and len(line.split()) > QUERY_WORDS + 4]
    lines = lines[:passages]
    if len(lines) < 2:
        raise EngineError("the embeddings dataset has fewer than 2 lines of 40+ characters",
                          hint="give eval.embeddings.dataset a longer text file (one passage per line)")
    step = max(1, len(lines) // max(1, queries))
    chosen = set(range(0, len(lines), step)[:queries])
    qs, ps = [], []
    for i, line in enumerate(lines):
        words = line.split()
        if i in chosen:
            qs.append(" ".join(words[:QUERY_WORDS]))
            ps.append(" ".join(words[QUERY_WORDS:]))
        else:
            ps.append(line)
    return qs, ps


def source_embedder(source_dir: Path, task: str) -> Any:
    """The source checkpoint as an engine model in PyTorch fp32 (the reference the variant is scored against)."""
    import torch
    from transformers import AutoModel, AutoModelForSeq2SeqLM, AutoTokenizer

    from .embedding import TorchEmbedder
    from .records import VariantRecord

    info = VariantRecord("source", 0, "transformers", recipe={"task": task}, artifact_dir=str(source_dir))
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    if task == "feature-extraction":
        return TorchEmbedder(info, AutoModel.from_pretrained(source_dir, dtype=torch.float32).eval(), tokenizer)
    return _TorchSeq2Seq(AutoModelForSeq2SeqLM.from_pretrained(source_dir, dtype=torch.float32).eval(), tokenizer)


class _TorchSeq2Seq:
    """The source encoder-decoder as the text2text scores read it: encode and decoder_logits."""

    def __init__(self, native: Any, tokenizer: Any) -> None:
        self.native, self.tokenizer = native, tokenizer

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text)["input_ids"]]

    def decoder_logits(self, input_ids: list[int], target_ids: list[int]) -> Any:
        return decoder_logits(self.native, input_ids, target_ids)


def decoder_logits(native: Any, input_ids: list[int], target_ids: list[int]) -> Any:
    """Teacher-forced next-token logits of an encoder-decoder [len(target_ids), vocab] (float32
    numpy): position i predicts target_ids[i] from the input and target_ids[:i]. `native` is a
    transformers or optimum-intel seq2seq model."""
    import numpy as np
    import torch

    start = int(native.config.decoder_start_token_id or 0)
    decoder = torch.tensor([[start] + list(target_ids[:-1])], dtype=torch.long)
    ids = torch.tensor([input_ids], dtype=torch.long)
    with torch.no_grad():
        out = native(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=decoder)
    logits = out.logits[0]
    return np.asarray(logits.float() if hasattr(logits, "float") else logits, dtype=np.float32)


def embedding_scores(model: Any, source: Any, spec: dict, progress: Progress) -> list[tuple[str, float, str]]:
    """(metric, value, unit) for a feature-extraction variant against its source."""
    import numpy as np

    queries, passages = read_corpus(spec["_files"], spec["queries"], spec["passages"])
    progress(f"evaluating: embedding {len(queries)} queries and {len(passages)} passages (source, then variant)")
    ref_q, ref_p = source.embed(queries), source.embed(passages)
    model.embed(passages[:8])  # warm-up
    started = time.perf_counter()
    var_p = model.embed(passages)
    per_second = len(passages) / (time.perf_counter() - started)
    var_q = model.embed(queries)
    cosines = np.concatenate([(ref_q * var_q).sum(axis=1), (ref_p * var_p).sum(axis=1)])
    k = min(spec["top_k"], len(passages))
    ref_top = np.argsort(-(ref_q @ ref_p.T), axis=1)[:, :k]
    var_top = np.argsort(-(var_q @ var_p.T), axis=1)[:, :k]
    agreement = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ref_top, var_top)]))
    return [("cosine_mean", float(cosines.mean()), "cos"), ("cosine_min", float(cosines.min()), "cos"),
            (f"retrieval_top{k}_agreement", agreement, "ratio"), ("sentences_per_s", per_second, "sent/s")]


def read_pairs(files: list[str], max_pairs: int) -> list[tuple[str, str]]:
    pairs = []
    for f in files:
        for line in Path(f).read_text(encoding="utf-8").splitlines():
            if "\t" in line:
                source, target = line.split("\t", 1)
                if source.strip() and target.strip():
                    pairs.append((source.strip(), target.strip()))
    if not pairs:
        raise EngineError("eval.text2text.dataset has no `input<TAB>target` line",
                          hint="one pair per line: the input text, a tab, the expected output")
    return pairs[:max_pairs]


def text2text_scores(model: Any, source: Any, spec: dict, progress: Progress) -> list[tuple[str, float, str]]:
    """(metric, value, unit): teacher-forced decoder KL / top-1 against the source, target perplexity."""
    import numpy as np

    from .metrics import kl_and_top1, log_softmax, perplexity

    pairs = read_pairs(spec["_files"], spec["max_pairs"])
    kl = nll = ref_nll = 0.0
    agree = count = 0
    for i, (text, target) in enumerate(pairs):
        progress(f"evaluating: pair {i + 1}/{len(pairs)}")
        ids, target_ids = source.encode(text), source.encode(target)
        ref = log_softmax(source.decoder_logits(ids, target_ids).astype(np.float64))
        var = log_softmax(model.decoder_logits(ids, target_ids).astype(np.float64))
        vocab = min(ref.shape[-1], var.shape[-1])  # exported heads may be padded differently
        ref, var = log_softmax(ref[:, :vocab]), log_softmax(var[:, :vocab])
        pair_kl, same = kl_and_top1(ref, var)
        kl, agree, count = kl + pair_kl, agree + same, count + len(target_ids)
        rows = np.arange(len(target_ids))
        nll -= float(var[rows, target_ids].sum())
        ref_nll -= float(ref[rows, target_ids].sum())
    return [("kl_divergence", kl / count, "nats"), ("top1_agreement", agree / count, "ratio"),
            ("target_perplexity", perplexity(nll, count), "ppl"),
            ("source_target_perplexity", perplexity(ref_nll, count), "ppl")]
