"""Runtime-independent text generation helpers: stop sequences, streaming decode, chat templates.

Written once so every runtime streams, stops and formats chats the same way.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from .errors import EngineError


class GeneratedText(str):
    """The generated text (a plain `str` to callers) that also carries counts and timings."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    finish_reason: str = "length"  # "eos" | "stop" | "length"

    @classmethod
    def make(cls, text: str, **facts) -> GeneratedText:
        out = cls(text)
        for key, value in facts.items():
            setattr(out, key, value)
        return out

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def cut_at_stop(text: str, stop: Iterable[str]) -> tuple[str, bool]:
    """Text up to the earliest stop sequence (excluded), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def stream_text(ids: Iterator[int], decode: Callable[[list[int]], str], eos: frozenset[int],
                stop: list[str]) -> Iterator[str]:
    """Turn a stream of token ids into text pieces.

    Decodes the whole sequence each step and emits only what is new, holding back an incomplete
    UTF-8 character and any tail that could still become a stop sequence, so a stop string split
    across tokens is never shown. Concatenated pieces equal the non-streamed text.
    """
    new: list[int] = []
    sent = ""
    hold = max((len(s) for s in stop if s), default=1) - 1
    for token in ids:
        if token in eos:
            break
        new.append(token)
        text, stopped = cut_at_stop(decode(new), stop)
        if stopped:
            break
        ready = text[: len(text) - hold] if hold else text
        if not ready.endswith("\ufffd") and ready.startswith(sent) and len(ready) > len(sent):
            yield ready[len(sent):]
            sent = ready
    final, _ = cut_at_stop(decode(new), stop)
    if final.startswith(sent) and len(final) > len(sent):
        yield final[len(sent):]


# -- chat templates ---------------------------------------------------------------------------------
def find_chat_template(folder: Path) -> tuple[str | None, dict[str, str]]:
    """The model's own chat template and special tokens, as saved beside its tokenizer."""
    config: dict = {}
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    template = None
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    elif isinstance(config.get("chat_template"), str):
        template = config["chat_template"]
    elif isinstance(config.get("chat_template"), list):  # named templates: use "default"
        named = {t.get("name"): t.get("template") for t in config["chat_template"]}
        template = named.get("default")
    tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return template, {k: v for k, v in tokens.items() if v is not None}


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise EngineError(f"chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(template)


def render_chat(template: str, messages: list[dict], special: dict[str, str],
                add_generation_prompt: bool = True) -> str:
    """Render like transformers' apply_chat_template (same Jinja settings and variables)."""
    check_messages(messages)
    return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise EngineError("messages must be a list of {'role': ..., 'content': ...} dicts with string values",
                          hint='e.g. [{"role": "user", "content": "Hello"}]')
