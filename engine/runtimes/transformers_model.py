"""The loaded model of runtimes whose native object generates like a transformers causal LM.

openvino (optimum-intel's OVModelForCausalLM) and itrex (a torch module with INC layers) both expose
`generate()`, a streamer hook and a `generation_config`: the four primitives are written once here
on top of them, so both stream, batch, sample and stop at EOS the same way. A subclass adds only
what differs (logits, load-time settings). torch and transformers are imported inside methods.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from queue import Queue
from typing import Any

from ..runtime import Model, Sampling


class _IdQueue:
    """A transformers streamer that hands new token ids to another thread (the prompt is skipped)."""

    def __init__(self) -> None:
        self.queue: Queue = Queue()
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate first puts the prompt itself
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(None)


def set_torch_threads(options: dict[str, Any]) -> None:
    """The `num_threads` load option of the PyTorch-based runtimes: torch's intra-op threads."""
    if "num_threads" not in options:
        return
    import torch

    from ..errors import EngineError

    threads = options["num_threads"]
    if not isinstance(threads, int) or threads < 1:
        raise EngineError(f"num_threads must be a positive integer, got {threads!r}")
    torch.set_num_threads(threads)


def _cancel_criteria(cancel: threading.Event) -> Any:
    """Stopping criteria that end generate once `cancel` is set (the consumer stopped reading)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Cancelled(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

    return StoppingCriteriaList([Cancelled()])


class TransformersModel(Model):
    """encode / decode / stream_ids / generate_ids through the tokenizer and `native.generate`."""

    #: a list of prompts is one generate call (left-padded); False: one call per prompt, same code
    batch_prompts: bool = True

    def __init__(self, info: Any, native: Any, tokenizer: Any) -> None:
        super().__init__(info, native)
        self.tokenizer = tokenizer
        config = native.generation_config  # the checkpoint's own ids first, then the tokenizer's
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_token_ids = frozenset(int(e) for e in eos if e is not None)
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else min(self.eos_token_ids, default=0)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer(text)["input_ids"]]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def generate_kwargs(self, s: Sampling) -> dict[str, Any]:
        """generate() arguments for the sampling settings; greedy whatever generation_config says."""
        kwargs: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample,
                                  "pad_token_id": self.pad_token_id, "eos_token_id": sorted(self.eos_token_ids)}
        if s.do_sample:
            kwargs.update({k: v for k, v in (("temperature", s.temperature), ("top_p", s.top_p),
                                             ("top_k", s.top_k)) if v is not None})
        else:  # the checkpoint's sampling defaults would only draw warnings
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if s.repetition_penalty is not None:
            kwargs["repetition_penalty"] = s.repetition_penalty
        return kwargs

    def _generate(self, input_ids: Any, attention_mask: Any, s: Sampling, **extra: Any) -> Any:
        """One seeded generate call; run it in the generating thread (torch's grad mode is per thread)."""
        import torch

        if s.seed is not None:
            torch.manual_seed(s.seed)
        with torch.no_grad():
            return self.native.generate(input_ids=input_ids, attention_mask=attention_mask,
                                        **self.generate_kwargs(s), **extra)

    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        """generate in a thread, its streamer feeding a queue: the same tokens as generate_ids."""
        import torch

        streamer, cancel = _IdQueue(), threading.Event()
        failure: list[BaseException] = []
        input_ids = torch.tensor([ids], dtype=torch.long)

        def work() -> None:
            try:
                self._generate(input_ids, torch.ones_like(input_ids), sampling, streamer=streamer,
                               stopping_criteria=_cancel_criteria(cancel))
            except BaseException as error:  # re-raised in the caller's thread below
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=work, name=f"{type(self).__name__}-generate", daemon=True)
        thread.start()
        try:
            while (token := streamer.queue.get()) is not None:
                yield token
                if token in self.eos_token_ids:
                    return
        finally:
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]

    def generate_ids(self, batch: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """The prompts as one batch, or one by one through the same code when batch_prompts is False."""
        if self.batch_prompts:
            return self._generate_batch(batch, sampling)
        return [self._generate_batch([ids], sampling)[0] for ids in batch]

    def _generate_batch(self, batch: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """One generate call: prompts left-padded to the longest, the padding masked out."""
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(ids)) + ids for ids in batch], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], dtype=torch.long)
        output = self._generate(input_ids, mask, sampling)
        return [self._until_eos(row) for row in output[:, width:].tolist()]

    def _until_eos(self, ids: list[int]) -> list[int]:
        """New ids up to and including the first EOS (rows of a batch run on after theirs)."""
        for i, token in enumerate(ids):
            if token in self.eos_token_ids:
                return ids[: i + 1]
        return ids


class Seq2SeqModel(TransformersModel):
    """An encoder-decoder (T5-style, task text2text-generation): the prompt is the encoder's input,
    the new tokens are the whole decoder output, so nothing is sliced off or decoded in context."""

    def decode_continuation(self, prompt_ids: list[int], new: list[int]) -> str:
        return self.decode(new)

    def _generate_batch(self, batch: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """One generate call: inputs right-padded (the encoder sees all of each, masked), outputs
        without the decoder's start token."""
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([ids + [self.pad_token_id] * (width - len(ids)) for ids in batch], dtype=torch.long)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch], dtype=torch.long)
        output = self._generate(input_ids, mask, sampling)
        return [self._until_eos(row[1:]) for row in output.tolist()]

    def decoder_logits(self, input_ids: list[int], target_ids: list[int]) -> Any:
        """Teacher-forced decoder logits [len(target_ids), vocab] (engine.task_eval.decoder_logits)."""
        from ..task_eval import decoder_logits

        return decoder_logits(self.native, input_ids, target_ids)

    def logits(self, ids: list[int]) -> Any:
        from ..tasks import wrong_task

        raise wrong_task(self, "text-generation", "return causal next-token logits (use decoder_logits)")
