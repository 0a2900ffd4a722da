"""Score arithmetic on logits: perplexity, KL divergence to the source, top-1 agreement.

The method, fixed here and recorded with every score:
* the dataset is tokenized once, by the source model's tokenizer, into one stream of ids;
* windows are `window` consecutive tokens, starting every `stride` tokens, at most `max_windows`;
* with `bos`, each window is fed as [BOS] + window and all `window` tokens are scored (each one
  predicted from BOS and the tokens before it); without, the first token of a window is context only;
* with stride < window, windows after the first score only their last `stride` tokens, so no token
  is scored twice (the sliding-window method of the transformers perplexity guide);
* perplexity = exp(total negative log-likelihood / scored tokens), natural log;
* KL = mean over the same scored positions of KL(P_source || P_variant), in nats (what llama.cpp's
  --kl-divergence reports); top-1 agreement = share of positions where both argmaxes agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    input_ids: list[int]  # what the model is fed
    first_scored: int  # index into input_ids of the first position whose *next* token is scored

    @property
    def targets(self) -> np.ndarray:
        return np.asarray(self.input_ids[self.first_scored + 1:], dtype=np.int64)


def make_windows(ids: list[int], window: int, stride: int, max_windows: int, bos_id: int | None) -> list[Window]:
    """Cut the token stream into scoring windows (see the module docstring)."""
    out: list[Window] = []
    start = 0
    while start < len(ids) and len(out) < max_windows:
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        overlap = 0 if not out else max(0, window - stride)
        if bos_id is not None:
            candidate = Window([bos_id, *chunk], overlap)
        else:
            candidate = Window(list(chunk), max(overlap - 1, 0) if out else 0)
        if len(candidate.targets):
            out.append(candidate)
        if start + window >= len(ids):
            break
        start += stride
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def scored_logprobs(logits: np.ndarray, window: Window) -> np.ndarray:
    """Log-probabilities at the scored positions: rows predict window.targets."""
    return log_softmax(logits[window.first_scored:len(window.input_ids) - 1])


def nll(logprobs: np.ndarray, targets: np.ndarray) -> float:
    """Summed negative log-likelihood of the targets."""
    return float(-logprobs[np.arange(len(targets)), targets].sum())


def kl_and_top1(ref_logprobs: np.ndarray, logprobs: np.ndarray) -> tuple[float, int]:
    """(summed KL(ref || variant) over positions, number of positions whose argmax agrees)."""
    ref = log_softmax(ref_logprobs)  # renormalise: a stored reference may have lost precision
    kl = float((np.exp(ref) * (ref - logprobs)).sum())
    agree = int((ref.argmax(axis=-1) == logprobs.argmax(axis=-1)).sum())
    return kl, agree


def perplexity(total_nll: float, count: int) -> float:
    return float(np.exp(total_nll / count)) if count else float("nan")


def recorded_windows_perplexity(windows: list[dict], logits_of) -> float:
    """Perplexity of `logits_of(input_ids)` over a reference pass's recorded windows
    (reference.json's {"input_ids", "first_scored"}): the same tokens every variant is scored on,
    for independent checks against another loader."""
    total, count = 0.0, 0
    for recorded in windows:
        window = Window(recorded["input_ids"], recorded["first_scored"])
        total += nll(scored_logprobs(logits_of(window.input_ids), window), window.targets)
        count += len(window.targets)
    return perplexity(total, count)
