"""Evaluation steps: the source model's reference pass (once per source and method) and the
scoring of a built variant through its own runtime (the artifact that ships is the one scored).

Both are cached store steps. The reference holds the scoring windows (token ids from the source
tokenizer) and the source's log-probabilities at every scored position, so every variant of the
same source is scored on exactly the same tokens. Method: see engine/metrics.py.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EngineError, SourceUnavailable
from .hashing import content_key
from .progress import task
from .tasks import key_part

REFERENCE_STEP_VERSION = 2  # 2: reference log-probs stored as float32
EVAL_STEP_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")

Progress = Callable[[str], None]


# -- the spec ------------------------------------------------------------------------------------
def eval_spec(recipe: dict, base_dir: Path, hash_file: Callable[[Path], str]) -> dict | None:
    """The normalized eval section (dataset by content hash), or None when the recipe has none.

    "_files" / "_hub" carry where the data is; they reach the steps but not the keys.
    """
    section = recipe.get("eval")
    if not section:
        return None
    spec: dict[str, Any] = {}
    ppl = section.get("perplexity")
    if ppl:
        files, hub, digest = _dataset(ppl["dataset"], base_dir, hash_file)
        window = ppl["window"]
        spec["perplexity"] = {
            "dataset_sha256": digest, "window": window, "stride": ppl.get("stride") or window,
            "max_windows": ppl["max_windows"], "bos": ppl["bos"], "fidelity": section.get("fidelity", True),
            "_files": files, "_hub": hub,
        }
    for name, settings in _task_sections(section).items():
        files, _, digest = _dataset(section[name]["dataset"], base_dir, hash_file)
        spec[name] = {"dataset_sha256": digest, **settings, "_files": files}
    speed = section.get("speed", {})
    if speed.get("enabled", True) and key_part(recipe).get("task") != "feature-extraction":  # sentences/s instead
        spec["speed"] = {"prompt_tokens": speed.get("prompt_tokens", 64), "new_tokens": speed.get("new_tokens", 32),
                         **key_part(recipe)}  # a text2text tokens/s is not a causal LM's: never compared
    return spec


def _task_sections(section: dict) -> dict[str, dict]:
    """eval.embeddings / eval.text2text with their defaults (method: engine/task_eval.py)."""
    found = {}
    if section.get("embeddings"):
        e = section["embeddings"]
        found["embeddings"] = {"queries": e.get("queries", 32), "passages": e.get("passages", 256),
                               "top_k": e.get("top_k", 10), "batch_size": 32, "task": "feature-extraction"}
    if section.get("text2text"):
        found["text2text"] = {"max_pairs": section["text2text"].get("max_pairs", 32), "teacher_forced": True,
                              "task": "text2text-generation"}
    return found


def _dataset(dataset: Any, base_dir: Path, hash_file) -> tuple[list[str], dict | None, str]:
    if isinstance(dataset, dict):  # a hub dataset, resolved by `datasets` when the network allows
        text = _hub_text(dataset)
        import hashlib

        return [], dataset, hashlib.sha256(text.encode("utf-8")).hexdigest()
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    files = []
    for name in names:
        path = (base_dir / name).expanduser().resolve()
        if not path.is_file():
            raise SourceUnavailable(f"evaluation dataset not found: {path} (eval.perplexity.dataset)",
                                    hint="give a local text file (relative to the recipe), a list of them, "
                                         "or {hub: wikitext, config: wikitext-2-raw-v1, split: test}")
        files.append(str(path))
    digests = [hash_file(Path(f)) for f in files]
    return files, None, digests[0] if len(digests) == 1 else content_key(digests)


def _hub_text(dataset: dict) -> str:
    try:
        import datasets  # noqa: F401 - optional: only hub datasets need it
    except ImportError:
        raise SourceUnavailable("a hub dataset in eval.perplexity.dataset needs the `datasets` package",
                                hint="pip install datasets, or give a local text file") from None
    from datasets import load_dataset

    try:
        rows = load_dataset(dataset["hub"], dataset.get("config"), split=dataset.get("split", "test"))
    except Exception as error:  # network or hub failure: one message, not a trace
        raise SourceUnavailable(f"cannot load hub dataset {dataset['hub']}: {error}".splitlines()[0],
                                hint="pre-download it with `datasets` where there is network, or give a local file") from None
    return "\n\n".join(rows[dataset.get("column", "text")])


def _read_text(spec: dict) -> str:
    if spec.get("_hub"):
        return _hub_text(spec["_hub"])
    return "".join(Path(f).read_text(encoding="utf-8") for f in spec["_files"])


def method(spec_part: dict) -> dict:
    return {k: v for k, v in spec_part.items() if not k.startswith("_")}


def reference_key(source_key: str, spec: dict, versions: dict) -> str:
    return content_key({"step": "reference", "v": REFERENCE_STEP_VERSION, "input": source_key,
                        "method": method(spec["perplexity"]), "versions": versions})


def eval_key(build_key: str, reference: str | None, spec: dict, versions: dict) -> str:
    return content_key({"step": "eval", "v": EVAL_STEP_VERSION, "input": build_key, "reference": reference,
                        "spec": {k: method(v) for k, v in spec.items()}, "versions": versions})


# -- the reference pass -----------------------------------------------------------------------------
def compute_reference(source_dir: Path, spec: dict, out_dir: Path, progress: Progress, *,
                      streamed: bool = False) -> dict:
    """Tokenize the dataset with the source tokenizer and score the source model (fp32, PyTorch).

    `streamed`: the same fp32 forward pass one decoder layer at a time (engine.streamed), for a model
    that does not fit in memory whole; its scores agree with the whole-model pass (tests/test_streamed.py),
    so both share the reference's key."""
    from .quiet import quiet_transformers

    quiet_transformers()
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .metrics import make_windows, nll, perplexity, scored_logprobs

    ppl = spec["perplexity"]
    progress("reference: tokenizing the dataset")
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    ids = tokenizer(_read_text(ppl), add_special_tokens=False)["input_ids"]
    bos_id = tokenizer.bos_token_id if ppl["bos"] else None
    windows = make_windows(ids, ppl["window"], ppl["stride"], ppl["max_windows"], bos_id)
    if not windows:
        raise EngineError("the evaluation dataset is too short for one window",
                          hint="use a longer text or a smaller eval.perplexity.window")
    if streamed:
        from .streamed import windows_logits

        all_logits = windows_logits(source_dir, [w.input_ids for w in windows], progress)
    else:
        model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32)
        model.eval()
        all_logits = _whole_model_logits(model, windows)
    total, count = 0.0, 0
    with task("reference: scoring the source", len(windows), "windows") as scored:
        for i, (window, logits) in enumerate(zip(windows, all_logits)):
            logprobs = scored_logprobs(logits, window)
            total += nll(logprobs, window.targets)
            count += len(window.targets)
            # float32: fp16 is too coarse for small KLs
            np.save(out_dir / f"ref-{i:04d}.npy", logprobs.astype(np.float32))
            scored.advance()
    meta = {
        "windows": [{"input_ids": w.input_ids, "first_scored": w.first_scored} for w in windows],
        "source_perplexity": perplexity(total, count), "scored_tokens": count,
        "dataset_tokens": len(ids), "bos_id": bos_id,
        "source_weight_bytes": sum(p.stat().st_size for p in Path(source_dir).iterdir()
                                   if p.suffix in WEIGHT_SUFFIXES),
        "pass": "streamed" if streamed else "whole",
    }
    (out_dir / "reference.json").write_text(json.dumps(meta))
    return {k: v for k, v in meta.items() if k != "windows"}


def _whole_model_logits(model: Any, windows: list) -> Any:
    """fp32 logits of each window from the model held whole in memory."""
    import torch

    for window in windows:
        with torch.no_grad():
            yield model(torch.tensor([window.input_ids])).logits[0].float().numpy()


# -- scoring a variant ------------------------------------------------------------------------------
def evaluate_variant(load: Callable[[], Any], artifact_size: int, spec: dict, reference_dir: Path | None,
                     progress: Progress, source_dir: Callable[[], Path] | None = None) -> list[dict]:
    """All metrics for one variant, through its runtime; returns score dicts ready to record.
    `source_dir` gives the source folder the task scores (embeddings, text2text) compare against."""
    started = time.perf_counter()
    model = load()
    load_seconds = time.perf_counter() - started
    scores: list[dict] = []
    for name in ("embeddings", "text2text"):
        if name in spec and source_dir is not None:
            scores += _task_scores(name, model, spec[name], source_dir(), artifact_size, progress)
    ref = json.loads((reference_dir / "reference.json").read_text()) if reference_dir else None
    if ref and "perplexity" in spec:
        scores += _quality(model, spec["perplexity"], ref, reference_dir, progress)
    elif "perplexity" in spec:  # no unquantized reference (a ready-made GGUF): its own tokens, perplexity only
        scores += _own_perplexity(model, spec["perplexity"], progress)
    if ref and ref.get("source_weight_bytes"):
        scores.append(_score("size_ratio", artifact_size / ref["source_weight_bytes"], "x source",
                             {"source_weight_bytes": ref["source_weight_bytes"]}))
    tasks = [spec[name]["task"] for name in ("embeddings", "text2text") if name in spec]
    scores.append(_score("size_bytes", artifact_size, "bytes", {"task": tasks[0]} if tasks else {}))
    if "speed" in spec:
        scores += _speed(model, spec["speed"], ref, load_seconds, progress)
    return scores


def _task_scores(name: str, model: Any, part: dict, source_dir: Path, artifact_size: int,
                 progress: Progress) -> list[dict]:
    from .task_eval import embedding_scores, source_embedder, text2text_scores

    task = "feature-extraction" if name == "embeddings" else "text2text-generation"
    source = source_embedder(source_dir, task)
    found = (embedding_scores if name == "embeddings" else text2text_scores)(model, source, part, progress)
    how = method(part)  # it names the task: never the same method as another task's score
    source_bytes = sum(p.stat().st_size for p in source_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    return ([_score(metric, value, unit, how) for metric, value, unit in found]
            + [_score("size_ratio", artifact_size / source_bytes, "x source",
                      {"source_weight_bytes": source_bytes, "task": task})])


def _quality(model: Any, ppl: dict, ref: dict, reference_dir: Path, progress: Progress) -> list[dict]:
    import numpy as np

    from .metrics import Window, kl_and_top1, nll, perplexity, scored_logprobs

    total = kl_sum = 0.0
    count = agree = 0
    windows = ref["windows"]
    with task("evaluating: scoring the variant", len(windows), "windows") as scored:
        for i, w in enumerate(windows):
            window = Window(w["input_ids"], w["first_scored"])
            logits = model.logits(window.input_ids)
            if i == 0 and ppl.get("fidelity", True):
                vocab = np.load(reference_dir / "ref-0000.npy", mmap_mode="r").shape[-1]
                if logits.shape[-1] != vocab:
                    raise EngineError(
                        f"the variant's vocabulary ({logits.shape[-1]} tokens) is not the reference's ({vocab}): "
                        "KL and top-1 cannot compare them",
                        hint="eval.reference must be the unquantized model the variant was made from")
            logprobs = scored_logprobs(logits, window)
            total += nll(logprobs, window.targets)
            count += len(window.targets)
            if ppl.get("fidelity", True):
                kl, same = kl_and_top1(np.load(reference_dir / f"ref-{i:04d}.npy"), logprobs)
                kl_sum += kl
                agree += same
            scored.advance()
    how = method(ppl)
    scores = [_score("perplexity", perplexity(total, count), "ppl", how),
              _score("source_perplexity", ref["source_perplexity"], "ppl", how)]
    if ppl.get("fidelity", True):
        scores += [_score("kl_divergence", kl_sum / count, "nats", how),
                   _score("top1_agreement", agree / count, "ratio", how)]
    return scores


def _own_perplexity(model: Any, ppl: dict, progress: Progress) -> list[dict]:
    """Perplexity over windows tokenized by the variant itself (no source tokenizer to share)."""
    from .metrics import make_windows, nll, perplexity, scored_logprobs

    progress("evaluating: tokenizing the dataset with the variant's tokenizer")
    start = model.encode("")  # what encode() puts first (BOS), if anything
    ids = model.encode(_read_text(ppl))[len(start):]
    bos_id = start[0] if ppl["bos"] and start else None
    windows = make_windows(ids, ppl["window"], ppl["stride"], ppl["max_windows"], bos_id)
    if not windows:
        raise EngineError("the evaluation dataset is too short for one window",
                          hint="use a longer text or a smaller eval.perplexity.window")
    total, count = 0.0, 0
    with task("evaluating: scoring the variant", len(windows), "windows") as scored:
        for window in windows:
            logprobs = scored_logprobs(model.logits(window.input_ids), window)
            total += nll(logprobs, window.targets)
            count += len(window.targets)
            scored.advance()
    return [_score("perplexity", perplexity(total, count), "ppl", method(ppl))]


def _speed(model: Any, speed: dict, ref: dict | None, load_seconds: float, progress: Progress) -> list[dict]:
    from .runtime import Sampling

    progress("measuring speed")
    ids = [t for w in (ref or {}).get("windows", []) for t in w["input_ids"]][: speed["prompt_tokens"]]
    if len(ids) < speed["prompt_tokens"]:
        ids = (model.encode("The quick brown fox jumps over the lazy dog. ") * speed["prompt_tokens"])[: speed["prompt_tokens"]]
    list(model.stream_ids(ids[:8], Sampling(max_new_tokens=2)))  # warm-up
    started = time.perf_counter()
    first = None
    produced = 0
    for _ in model.stream_ids(ids, Sampling(max_new_tokens=speed["new_tokens"])):
        produced += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    how = {**speed, "batch": 1, "threads": os.cpu_count(), "machine": machine()}
    scores = [_score("load_seconds", load_seconds, "s", how),
              _score("prefill_tokens_per_s", len(ids) / (first - started), "tok/s", how)]
    if produced > 1:
        scores.append(_score("decode_tokens_per_s", (produced - 1) / (end - first), "tok/s", how))
    return scores


def machine() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({platform.machine()})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _score(metric: str, value: float, unit: str, how: dict) -> dict:
    return {"metric": metric, "value": float(value), "unit": unit, "method": how, "method_id": content_key(how)}
