"""The interface every runtime implements, and the model object users get back.

A runtime describes itself in one place (its class attributes: name, pip extra, the distributions
whose versions key its cache, devices, tasks, weight types, algorithms, load options), turns a
validated recipe into the parameters that determine the artifact (nothing else enters the key, so
a description change never rebuilds), builds an artifact from a source folder, and loads one.
The core reads only this interface; runtimes are found by name through the `engine.runtimes`
entry-point group (engine/discovery.py), so a third party can ship one as a pip package.
Runtime modules import their heavy libraries inside methods, never at module level.

A loaded model implements four primitives (encode, decode, stream token ids, generate a batch of
token ids); everything users call (generate, chat, stream, stop sequences) is written once here on
top of them, so every runtime behaves the same.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EngineError
from .records import VariantRecord
from .textgen import GeneratedText, cut_at_stop, find_chat_template, render_chat, stream_text

if TYPE_CHECKING:
    from .buildenv import BuildEnv

Progress = Callable[[str], None]

#: prompt tokens decoded before the new ones so the first new word keeps its leading space
_CONTEXT = 4


@dataclass(frozen=True)
class Sampling:
    """Decoding settings, the same names as transformers' GenerationConfig."""

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


class Model(ABC):
    """What `engine.load()` returns, whatever the runtime.

    generate / chat / stream accept the same decoding settings everywhere; results are
    `GeneratedText` strings that also carry token counts and timings.
    """

    #: token ids that end a generation (filled by the runtime from the artifact's config)
    eos_token_ids: frozenset[int] = frozenset()

    def __init__(self, info: VariantRecord, native: Any) -> None:
        self.info = info  # the registry record of the variant (info.artifact_dir: its files)
        self.native = native  # the runtime's own object, for anything the engine does not wrap
        folder = info.artifact_dir
        self.chat_template, self.special_tokens = find_chat_template(Path(folder)) if folder else (None, {})

    @property
    def name(self) -> str:
        return self.info.ref

    # -- primitives each runtime implements ------------------------------------------------------
    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids for `text`, with the special tokens the model expects at the start (BOS)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text for token ids, special tokens dropped."""

    @abstractmethod
    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        """Yield new token ids one by one as they are produced; stop at EOS or max_new_tokens."""

    def decode_continuation(self, prompt_ids: list[int], new: list[int]) -> str:
        """The text `new` adds after the prompt: decode(prompt + new) minus decode(prompt), as
        transformers' text-generation pipeline does (return_full_text=False).

        Decoding `new` alone is wrong for SentencePiece tokenizers (Llama, Mistral, Phi-3.5): they
        drop the space of a sequence's first word, so "The history of the city" + "▁is" would read
        "is", not " is". A few prompt tokens of context are enough; the whole prompt if they are not
        (a multi-byte character split across the boundary).
        """
        if not new:
            return ""
        for context in (prompt_ids[-_CONTEXT:], prompt_ids):
            before, text = self.decode(context), self.decode(context + new)
            if text.startswith(before):
                return text[len(before):]
            if len(context) == len(prompt_ids):
                break
        return self.decode(new)

    def generate_ids(self, batch: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """New token ids for each prompt. Runtimes that can batch override this."""
        return [list(self.stream_ids(ids, sampling)) for ids in batch]

    def embed(self, texts: list[str], batch_size: int = 32, normalize: bool = True,
              instruction: str | None = None) -> Any:
        """Sentence embeddings: only feature-extraction variants (engine.embedding.EmbeddingModel) have them."""
        from .tasks import wrong_task

        raise wrong_task(self, "feature-extraction", "embed")

    def logits(self, ids: list[int]) -> Any:
        """Next-token logits at every position of `ids`: a float numpy array [len(ids), vocab].

        Evaluation scores the shipped artifact through this, so every runtime provides it.
        """
        raise EngineError(f"runtime {self.info.runtime} cannot return logits, so it cannot be evaluated")

    # -- what users call -------------------------------------------------------------------------
    def generate(self, prompt: str | list[str], max_new_tokens: int = 64, *, do_sample: bool = False,
                 temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, stop: list[str] | None = None) -> Any:
        """Continue `prompt` (or each prompt of a list, as one batch); returns only the new text.

        Greedy unless do_sample. `stop` cuts the text before the first stop sequence.
        """
        sampling = Sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        encoded = [self.encode(p) for p in prompts]
        started = time.perf_counter()
        outputs = self.generate_ids(encoded, sampling) if encoded else []
        seconds = time.perf_counter() - started
        texts = [self._finish(ids, out, stop or [], seconds) for ids, out in zip(encoded, outputs)]
        return texts[0] if isinstance(prompt, str) else texts

    def _finish(self, prompt_ids: list[int], new: list[int], stop: list[str], seconds: float) -> GeneratedText:
        cut = next((i for i, t in enumerate(new) if t in self.eos_token_ids), len(new))
        text, stopped = cut_at_stop(self.decode_continuation(prompt_ids, new[:cut]), stop)
        reason = "stop" if stopped else "eos" if cut < len(new) else "length"
        return GeneratedText.make(text, prompt_tokens=len(prompt_ids), new_tokens=cut, seconds=seconds,
                                  finish_reason=reason)

    def stream(self, prompt: str | list[dict], max_new_tokens: int = 64, *, do_sample: bool = False,
               temperature: float | None = None, top_p: float | None = None, top_k: int | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop: list[str] | None = None) -> Iterator[str]:
        """Yield text pieces as they are produced (prompt skipped, special tokens dropped).

        `prompt` may be a list of chat messages: the model's chat template is applied first.
        Stop sequences are honoured even when split across pieces.
        """
        text = self.apply_chat_template(prompt) if isinstance(prompt, list) else prompt
        sampling = Sampling(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        ids = self.encode(text)
        yield from stream_text(self.stream_ids(ids, sampling), lambda new: self.decode_continuation(ids, new),
                               self.eos_token_ids, stop or [])

    def chat(self, messages: list[dict], max_new_tokens: int = 256, **settings: Any) -> GeneratedText:
        """Answer the last message of a conversation, formatted with the model's own chat template."""
        return self.generate(self.apply_chat_template(messages), max_new_tokens, **settings)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise EngineError(
                f"{self.name} has no chat template (no chat_template.jinja or tokenizer_config.json entry)",
                hint="use generate() with a prompt you format yourself",
            )
        text = render_chat(self.chat_template, messages, self.special_tokens, add_generation_prompt)
        bos = self.special_tokens.get("bos_token")
        if bos and text.startswith(bos) and self.encode(""):  # encode() adds BOS itself: not twice
            text = text[len(bos):]
        return text

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} runtime={self.info.runtime}>"


@dataclass(frozen=True)
class Section:
    """A table `engine show` adds for a runtime (e.g. ITREX settings -> what INC got)."""

    title: str
    columns: tuple[str, ...]
    rows: list[list[Any]] = field(default_factory=list)


class Runtime(ABC):
    """A runtime's declaration (class attributes) and its three jobs: params, build, load."""

    #: the name recipes use in target.runtime (and the entry-point name)
    name: str
    #: the pip extra that installs it: `pip install 'engine[<extra>]'`
    extra: str = "all"
    #: distributions whose versions change the artifact bytes (part of the cache key)
    distributions: tuple[str, ...] = ()
    #: target.device values it supports (the first is the default the common schema fills: cpu)
    devices: tuple[str, ...] = ("cpu",)
    #: what kind of model it builds (recipe `task`; engine/tasks.py)
    tasks: tuple[str, ...] = ("text-generation",)
    #: quantization.weight_dtype values it supports
    weight_dtypes: tuple[str, ...] = ()
    #: quantization.algorithm values it supports
    algorithms: tuple[str, ...] = ("rtn",)
    #: keyword options of engine.load(name, **options): name -> what it does
    load_options: dict[str, str] = {}
    #: a cheap variant of this runtime (a recipe's quantization section) for smoke tests and docs
    example_quantization: dict[str, Any] = {"weight_dtype": "int8"}
    #: bump when the engine's own build code changes what it writes (part of the cache key)
    step_version: int = 1
    #: files to fetch from a hub repository for a build
    source_patterns: tuple[str, ...] = (
        "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken",
    )
    #: build facts (artifact meta keys) too long or internal for `engine show`'s summary
    hidden_meta: tuple[str, ...] = ()
    #: source formats it builds from (engine.sources.Source.format): "hf" folders; "gguf" files
    source_formats: tuple[str, ...] = ("hf",)
    #: a virtualenv of its own for build() (engine.buildenv): its pins enter the build key, and the
    #: pipeline hands build() its interpreter as params["_build_python"]; None: builds run in ours
    build_env: BuildEnv | None = None
    #: what its artifact folder is to other runtimes: "hf" (a Hugging Face checkpoint that can be the
    #: source of another recipe, `source: {variant: ...}`); None: an artifact only this runtime reads
    artifact_format: str | None = None

    # -- what a recipe gets where it leaves a field out ------------------------------------------------
    def defaults(self, recipe: dict) -> dict[str, Any]:
        """Dotted recipe keys -> the value this runtime's backend recommends, filled where the recipe
        leaves the key out (after the common schema's defaults, before the runtime's schema check).
        `engine show` marks the values a recipe did not write."""
        return {"quantization.compute_dtype": "fp32"}

    # -- the declaration as a JSON Schema ----------------------------------------------------------
    def schema_document(self) -> dict:
        """Constraints beyond the declaration (options, group sizes, hints): a JSON Schema over the
        whole recipe. Built-in runtimes keep theirs in schemas/runtimes/<name>.schema.json."""
        return {"type": "object"}

    def schema(self) -> dict:
        """The runtime's recipe schema: schema_document() with the declared enums filled in."""
        import copy

        doc = copy.deepcopy(self.schema_document())
        doc.setdefault("title", f"runtime {self.name}")
        props = doc.setdefault("properties", {})
        quant = props.setdefault("quantization", {"type": "object"}).setdefault("properties", {})
        target = props.setdefault("target", {"type": "object"}).setdefault("properties", {})
        quant.setdefault("weight_dtype", {})["enum"] = list(self.weight_dtypes)
        quant.setdefault("algorithm", {})["enum"] = list(self.algorithms)
        target.setdefault("device", {})["enum"] = list(self.devices)
        return doc

    # -- jobs --------------------------------------------------------------------------------------
    @abstractmethod
    def build_params(self, recipe: dict, base_dir: Path, source: Any) -> dict:
        """The normalized parameters that determine the artifact (JSON-able).

        `source` is the recipe's engine.sources.Source: `source.config()` reads config.json without
        downloading or building anything. Keys starting with "_" reach `build` but not the cache
        key: use them for inputs whose content the key already holds (a calibration file's path
        beside its content hash).
        """

    def recipe_issues(self, recipe: Any, source: Any) -> list:
        """Problems a schema cannot see (the recipe against its source, say), as RecipeIssues located
        with `recipe.issue(path, message, hint)`; planning refuses the recipe when there are any.
        `recipe` is the engine.recipe.Recipe (`recipe.positions` tells what the file itself sets)."""
        return []

    def check_available(self, recipe: dict) -> None:
        """Raise RuntimeUnavailable when this machine cannot build/run the recipe's target."""

    @abstractmethod
    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path,
              progress: Progress) -> dict:
        """Write the artifact into `out_dir`; return facts worth recording (JSON-able)."""

    def load(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        """Open a built artifact (`info` is the registry's VariantRecord); options are checked
        against `load_options` first."""
        self.check_load_options(options)
        return self.open(artifact_dir, info, **options)

    @abstractmethod
    def open(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        """Open a built artifact with options already checked by name."""

    def check_load_options(self, options: dict[str, Any]) -> None:
        unknown = sorted(set(options) - set(self.load_options))
        if unknown:
            takes = ", ".join(f"{k} ({v})" for k, v in self.load_options.items()) or "no options"
            raise EngineError(f"unknown load option(s) for runtime '{self.name}': {', '.join(unknown)}",
                              hint=f"runtime '{self.name}' takes {takes}")

    def run_failure_hint(self, message: str, source_dir: Path) -> str | None:
        """A hint for an artifact that built but failed its first forward pass (`message`: the
        backend's words). The default names the other installed runtimes."""
        from .discovery import runtime_names

        others = [n for n in runtime_names() if n != self.name]
        return f"try another runtime ({', '.join(others)})" if others else None

    def weight_precisions(self, artifact_dir: Path) -> list:
        """What each weight tensor became, read from the artifact itself (engine.precision
        WeightPrecision rows); recorded at build time for `engine show` and `engine diff`."""
        return []

    # -- memory (engine.memory, docs/memory.md) ------------------------------------------------------
    def build_memory(self, facts: Any, params: dict) -> Any:
        """The build's peak (an engine.memory.Estimate) for a model with these ModelFacts. The
        default assumes a builder that holds the whole model in fp32; override with what the
        backend is measured to do."""
        from .memory import default_build

        return default_build(facts)

    def eval_memory(self, facts: Any, params: dict, window: int) -> Any:
        """Scoring a variant: the loaded artifact and one window's logits (an Estimate)."""
        from .memory import default_eval

        return default_eval(facts, window)

    # -- what `engine show` adds -------------------------------------------------------------------
    def show_sections(self, meta: dict) -> list[Section]:
        """Tables `engine show` prints for a variant of this runtime, from its build facts."""
        return []

    def __repr__(self) -> str:
        return f"<runtime {self.name}>"
