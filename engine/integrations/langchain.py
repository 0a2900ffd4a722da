"""A LangChain LLM over a registered variant: `prompt | EngineLLM(name="phi35-int4-cpu")`.

Needs the `langchain` extra (langchain-core). `invoke`, `batch` (one real batch through the
runtime), `stream` and `bind(stop=[...])` all go through the engine's one inference API.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

try:
    from langchain_core.callbacks import CallbackManagerForLLMRun
    from langchain_core.language_models.llms import LLM
    from langchain_core.outputs import Generation, GenerationChunk, LLMResult
    from pydantic import PrivateAttr
except ImportError as error:  # pragma: no cover - exercised only without the extra
    from ..errors import RuntimeUnavailable

    raise RuntimeUnavailable("engine.integrations.langchain needs langchain-core",
                             hint="pip install 'engine[langchain]'") from error


class EngineLLM(LLM):
    """A registered variant as a LangChain LLM (loaded on first use, then kept)."""

    name: str
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    registry: str | None = None
    store: str | None = None
    verify: bool = False
    load_options: dict[str, Any] = {}

    _model: Any = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "engine"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"name": self.name, "max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}

    @property
    def model(self) -> Any:
        if self._model is None:
            from ..loader import load

            self._model = load(self.name, verify=self.verify, registry=self.registry, store=self.store,
                               **self.load_options)
        return self._model

    def _settings(self, stop: list[str] | None, kwargs: dict) -> dict[str, Any]:
        settings = {key: getattr(self, key) for key in (
            "max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "seed")}
        settings.update({k: v for k, v in kwargs.items() if k in settings})
        settings["stop"] = list(stop or [])
        return settings

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        return str(self.model.generate(prompt, **self._settings(stop, kwargs)))

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        texts = self.model.generate(list(prompts), **self._settings(stop, kwargs))
        return LLMResult(generations=[[Generation(text=str(t), generation_info={
            "finish_reason": t.finish_reason, "new_tokens": t.new_tokens, "prompt_tokens": t.prompt_tokens})]
            for t in texts])

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        for piece in self.model.stream(prompt, **self._settings(stop, kwargs)):
            chunk = GenerationChunk(text=piece)
            if run_manager:
                run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
