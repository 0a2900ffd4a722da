"""Runtime `llama.cpp`: GGUF files made by llama.cpp's converter and quantizer, run by llama-cpp-python.

Build (a child process, engine/runtimes/llamacpp_build.py): HF checkpoint -> GGUF (f32/f16/bf16) with
llama.cpp's own `convert_hf_to_gguf.py`, then, with `quantization.calibration`, an importance matrix
collected by `llama-imatrix` on those texts, then `llama-quantize` to the file type. The converter
and the two tools come from the sdist of the installed llama-cpp-python (engine/runtimes/
llamacpp_tools.py), so the key's llama-cpp-python version names the whole llama.cpp release.

A ready-made `.gguf` (`source: {path: x.gguf}` or `{model, revision, file}`) is registered as it is:
its quantization is read from the file, recorded, and checked against what the recipe says.

Vocabulary: weight_dtype int8 -> Q8_0, int4 -> Q4_K_M, fp16/bf16/fp32 -> F16/BF16/F32;
`target.options.ftype` names any llama.cpp file type. Loading: llama_cpp.Llama, with n_ctx,
n_threads, n_batch and n_gpu_layers as checked load options. Heavy imports stay inside methods.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..calibration import calibration_key, load_texts
from ..errors import EngineError, RecipeIssue
from ..recipe.schemas import load_schema
from ..runtime import Model, Progress, Runtime, Sampling, Section
from ..subproc import run_job

GGUF_FILE = "model.gguf"
#: weight_dtype -> the llama.cpp file type it means
WEIGHT_DTYPE_FTYPE = {"int8": "Q8_0", "int4": "Q4_K_M", "fp16": "F16", "bf16": "BF16", "fp32": "F32"}
#: file types the converter writes itself (no quantizer run)
FLOAT_FTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
#: bytes per weight of each file type, about (llama.cpp's own bits-per-weight table, rounded up)
_BYTES_PER_WEIGHT = {"F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 1.07, "Q6_K": 0.83, "Q5_K_M": 0.72,
                     "Q4_K_M": 0.61, "Q4_0": 0.57, "IQ4_NL": 0.57, "Q3_K_M": 0.49, "Q2_K": 0.42}
#: llama.cpp file types (llama-quantize names) and the weight_dtype class each belongs to (None: no class)
FTYPES: dict[str, str | None] = {
    "Q8_0": "int8", "Q6_K": None, "Q5_K_M": None, "Q5_K_S": None, "Q5_1": None, "Q5_0": None,
    "Q4_K_M": "int4", "Q4_K_S": "int4", "Q4_1": "int4", "Q4_0": "int4", "IQ4_NL": "int4", "IQ4_XS": "int4",
    "Q3_K_L": None, "Q3_K_M": None, "Q3_K_S": None, "IQ3_M": None, "IQ3_S": None, "IQ3_XS": None,
    "IQ3_XXS": None, "Q2_K": None, "Q2_K_S": None, "IQ2_M": None, "IQ2_S": None, "IQ2_XS": None,
    "IQ2_XXS": None, "IQ1_M": None, "IQ1_S": None, "F16": "fp16", "BF16": "bf16", "F32": "fp32",
}
#: file types llama-quantize refuses without an importance matrix (tensor_requires_imatrix)
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S", "Q2_K_S")
#: PyTorch module name pieces -> GGUF tensor name pieces (llama-style checkpoints; what skip_modules maps)
MODULE_PIECES = (
    (r"^model\.embed_tokens$", "token_embd"), (r"^lm_head$", "output"),
    (r"^model\.layers\.(\d+)", r"blk.\1"), (r"\.self_attn\.q_proj", ".attn_q"), (r"\.self_attn\.k_proj", ".attn_k"),
    (r"\.self_attn\.v_proj", ".attn_v"), (r"\.self_attn\.o_proj", ".attn_output"),
    (r"\.self_attn\.qkv_proj", ".attn_qkv"), (r"\.mlp\.gate_proj", ".ffn_gate"), (r"\.mlp\.up_proj", ".ffn_up"),
    (r"\.mlp\.down_proj", ".ffn_down"), (r"\.mlp\.gate_up_proj", ".ffn_up"), (r"\.self_attn$", ".attn_"),
    (r"\.mlp$", ".ffn_"),
)
LOAD_OPTIONS = {"n_ctx": "context length in tokens (default: the model's, at most 4096)",
                "n_threads": "CPU threads", "n_batch": "prompt tokens per batch",
                "n_gpu_layers": "layers offloaded to a GPU build of llama.cpp"}


def module_tensor_pattern(module: str) -> str:
    """A PyTorch module name as a regex over GGUF tensor names (`model.layers.0.mlp.down_proj` ->
    `^blk\\.0\\.ffn_down\\.`, `lm_head` -> `^output\\.`): what llama-quantize's --tensor-type takes."""
    name = module
    for pattern, repl in MODULE_PIECES:
        name = re.sub(pattern, repl, name)
    return "^" + re.escape(name) + ("" if name.endswith("_") else r"\.")


def ftype_of(recipe: dict) -> str:
    """The llama.cpp file type a recipe asks for: target.options.ftype, else from weight_dtype."""
    options = recipe["target"].get("options", {})
    return options.get("ftype") or WEIGHT_DTYPE_FTYPE[recipe["quantization"]["weight_dtype"]]


def _intermediate(options: dict, config: dict | None) -> str:
    """The converter's output type before quantizing: as the checkpoint stores it, else f32."""
    chosen = options.get("intermediate", "auto")
    if chosen != "auto":
        return chosen
    stored = str((config or {}).get("dtype") or (config or {}).get("torch_dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "f16"}.get(stored, "f32")


class LlamaCppRuntime(Runtime):
    name = "llama.cpp"
    extra = "llamacpp"
    distributions = ("llama-cpp-python", "gguf", "torch", "numpy", "sentencepiece")
    devices = ("cpu",)
    weight_dtypes = tuple(WEIGHT_DTYPE_FTYPE)
    algorithms = ("rtn",)
    load_options = LOAD_OPTIONS
    example_quantization = {"weight_dtype": "int8"}
    source_formats = ("hf", "gguf")
    step_version = 1
    hidden_meta = ("tensor_types", "tool_args", "gguf_metadata", "toolkit", "kept", "probe", "built_weight_type",
                   "weight_dtype_mapping", "imatrix_summary")

    def schema_document(self) -> dict:
        return load_schema("runtimes/llama.cpp")

    # -- planning ---------------------------------------------------------------------------------
    def build_params(self, recipe: dict, base_dir: Path, source: Any) -> dict:
        if getattr(source, "format", "hf") == "gguf":
            # what the recipe says the file is; checked at plan time when the file is here, else by the build
            stated = {"ftype": recipe["target"].get("options", {}).get("ftype")}
            return {"precision": "gguf import", "import": True, "_stated": stated}
        quant, options = recipe["quantization"], recipe["target"].get("options", {})
        ftype = ftype_of(recipe)
        params: dict[str, Any] = {"precision": ftype, "ftype": ftype,
                                  "intermediate": _intermediate(options, source.config()),
                                  "_mapping": (f"target.options.ftype {ftype}" if options.get("ftype") else
                                               f"weight_dtype {quant['weight_dtype']} -> {ftype}")}
        if ftype not in FLOAT_FTYPES:
            skip_type = options.get("skip_type", "F16")
            params["keep"] = {m: {"pattern": module_tensor_pattern(m), "type": skip_type}
                              for m in sorted(quant["skip_modules"])}
            if quant.get("calibration"):
                params["imatrix"] = calibration_key(quant["calibration"], base_dir)
                params["_calibration"] = quant["calibration"]
                params["_base_dir"] = str(base_dir)
        return params

    def recipe_issues(self, recipe: Any, source: Any) -> list[RecipeIssue]:
        """What a schema cannot see: a ready-made GGUF against the quantization the recipe states."""
        if getattr(source, "format", "hf") != "gguf":
            return []
        written = recipe.positions
        issues = []
        for key in ("calibration", "skip_modules", "algorithm"):
            if ("quantization", key) in written and recipe.data["quantization"].get(key):
                issues.append(recipe.issue(("quantization", key), "has no meaning for a ready-made GGUF file "
                                           "(it is registered as it is, not re-quantized)",
                                           f"remove quantization.{key}"))
        stated_dtype = recipe.data["quantization"]["weight_dtype"] if ("quantization", "weight_dtype") in written else None
        stated_ftype = recipe.data["target"].get("options", {}).get("ftype")
        if stated_dtype is None and stated_ftype is None:
            return issues
        path = source.local_file()
        if path is None:  # a hub file not downloaded yet: the build checks it
            return issues
        from .gguf_info import GgufInvalid, read_info

        try:
            actual = read_info(path)["ftype"]
        except GgufInvalid as error:
            return issues + [recipe.issue(("source", "path"), error.message, error.hint)]
        if stated_ftype and stated_ftype != actual:
            issues.append(recipe.issue(("target", "options", "ftype"),
                                       f"'{stated_ftype}' contradicts the file, which is {actual}",
                                       f"write ftype: {actual}, or leave it out (it is read from the file)"))
        if stated_dtype and FTYPES.get(actual) != stated_dtype:
            match = FTYPES.get(actual)
            issues.append(recipe.issue(("quantization", "weight_dtype"),
                                       f"'{stated_dtype}' contradicts the file, which is {actual}",
                                       (f"write weight_dtype: {match}" if match else
                                        f"{actual} has no weight_dtype name: leave weight_dtype out")
                                       + " (the quantization is read from the file)"))
        return issues

    # -- building ---------------------------------------------------------------------------------
    def check_available(self, recipe: dict) -> None:
        """Building from a checkpoint needs llama.cpp's converter and tools (`make install`)."""
        from ..sources import GgufSource
        from .llamacpp_tools import find

        if not GgufSource.accepts(recipe.get("source", {})):
            find()

    def eval_memory(self, facts: Any, params: dict, window: int) -> Any:
        """llama.cpp maps the GGUF (its size: bits per weight of the file type) and copies ("repacks")
        most of its weights into the process's own memory when it loads them (counted as 3/4 of the
        file); the scoring context's f16 KV cache (512 tokens or the window, at the hidden size: high
        with grouped KV heads) and the logits come on top. The generation context's 4096-token KV cache
        is allocated but not touched while scoring. Measured (scoring only, RssAnon, plus the 0.4 GB of
        torch the engine process has imported): Llama-3-8B shapes Q4_K_M 4.09 + 0.40 GB, Phi-3.5-mini
        shapes 2.28 GB (docs/memory.md)."""
        from ..memory import TORCH_BASE, Estimate, logits_bytes

        gguf = int(_BYTES_PER_WEIGHT.get(str(params.get("ftype")), 2.0) * facts.params)
        kv = 2 * 2 * facts.layers * facts.hidden_size * max(window, 512)
        return Estimate(TORCH_BASE + gguf * 3 // 4 + kv + 3 * logits_bytes(facts, window), gguf,
                        f"weights repacked from the mapped GGUF ({params.get('ftype')}), KV cache")

    def build_memory(self, facts: Any, params: dict) -> Any:
        """convert_hf_to_gguf.py is lazy (one tensor at a time from the mapped checkpoint) and
        llama-quantize maps the 16-bit GGUF: the largest tensor in fp32 plus the mapped files."""
        from ..memory import TORCH_BASE, Estimate

        if facts is None:  # a ready-made .gguf is registered as it is
            return None
        largest = max(facts.outer_params // 2, facts.layer_params // 3)
        return Estimate(TORCH_BASE + 2 * 4 * largest, facts.stored_bytes + 2 * facts.params,
                        "lazy converter, one tensor at a time (not measured at scale)")

    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path, progress: Progress) -> dict:
        from .llamacpp_tools import find

        kit = find()
        job: dict[str, Any] = {"source_dir": str(source_dir), "out_dir": str(out_dir), "params":
                               {k: v for k, v in params.items() if not k.startswith("_")},
                               "stated": params.get("_stated", {}),
                               "toolkit": str(kit.root), "scratch": str(out_dir.parent / "scratch")}
        if "_calibration" in params:
            job["calibration_texts"] = load_texts(params["_calibration"], Path(params["_base_dir"]))
        result = run_job("engine.runtimes.llamacpp_build", job, logs_dir, on_line=progress,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, what="llama.cpp build")
        return {**result, "toolkit": kit.info, **({"weight_dtype_mapping": params["_mapping"]} if "_mapping" in params else {})}

    def show_sections(self, meta: dict) -> list[Section]:
        sections = []
        if meta.get("ftype"):
            rows = [["file type", meta["ftype"]], ["file", GGUF_FILE],
                    ["made by", "imported as it is" if meta.get("imported") else
                     f"convert_hf_to_gguf.py ({meta.get('intermediate')}) + llama-quantize"],
                    ["importance matrix", meta.get("imatrix_summary", "none")]]
            if meta.get("weight_dtype_mapping"):
                rows.insert(1, ["from", meta["weight_dtype_mapping"]])
            if meta.get("architecture"):
                rows.append(["architecture", meta["architecture"]])
            sections.append(Section("llama.cpp GGUF", ("what", "value"), rows))
        if meta.get("tensor_types"):
            sections.append(Section("GGUF tensor types", ("type", "tensors"),
                                    [[t, n] for t, n in sorted(meta["tensor_types"].items())]))
        if meta.get("kept"):
            sections.append(Section("skip_modules -> kept tensors", ("module", "tensors", "type"), meta["kept"]))
        return sections

    # -- loading ----------------------------------------------------------------------------------
    def open(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        for key, value in options.items():
            if not isinstance(value, int) or isinstance(value, bool) or (value < 1 and key != "n_gpu_layers"):
                raise EngineError(f"load option {key} must be a positive integer, got {value!r}",
                                  hint="n_gpu_layers may also be -1 (all layers)" if key == "n_gpu_layers" else None)
        return LlamaCppModel(info, Path(artifact_dir) / GGUF_FILE, options)


def _llama(path: Path, options: dict, **extra: Any) -> Any:
    from llama_cpp import Llama

    try:
        return Llama(model_path=str(path), verbose=False, **options, **extra)
    except (ValueError, RuntimeError) as error:
        raise EngineError(f"llama.cpp cannot load {path}: {error}",
                          hint="run `engine verify` to check the file; see docs/llamacpp.md") from None


class LlamaCppModel(Model):
    """A GGUF file in llama_cpp.Llama; `native` is the Llama object."""

    def __init__(self, info: Any, path: Path, options: dict) -> None:
        options = dict(options)
        self._path = path
        self._ctx_train = _ctx_train(path)
        options.setdefault("n_ctx", min(self._ctx_train or 4096, 4096))
        self._options = options
        native = _llama(path, options)
        super().__init__(info, native)
        self._scorer: Any = None
        self.eos_token_ids = frozenset(t for t in (native.token_eos(),) if t is not None and t >= 0)
        self._bos = native.token_bos()
        if not self.chat_template:  # the GGUF's own template (tokenizer.chat_template) and tokens
            self.chat_template = native.metadata.get("tokenizer.chat_template")
            self.special_tokens = {"bos_token": self._piece(self._bos), "eos_token": self._piece(native.token_eos())}

    def _piece(self, token: int) -> str | None:
        if token is None or token < 0:
            return None
        return self.native.detokenize([token], special=True).decode("utf-8", "replace")

    def encode(self, text: str) -> list[int]:
        return list(self.native.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def decode(self, ids: list[int]) -> str:
        ids = [t for t in ids if t not in self.eos_token_ids and t != self._bos]
        return self.native.detokenize(ids).decode("utf-8", "replace")

    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        llm = self.native
        if sampling.seed is not None:
            llm.set_seed(sampling.seed)
        if sampling.do_sample:
            knobs = {"temp": sampling.temperature if sampling.temperature is not None else 1.0,
                     "top_k": sampling.top_k or 0, "top_p": sampling.top_p if sampling.top_p is not None else 1.0}
        else:
            knobs = {"temp": 0.0, "top_k": 1, "top_p": 1.0}
        room = llm.n_ctx() - len(ids)
        if room <= 0:
            raise EngineError(f"the prompt ({len(ids)} tokens) does not fit the context ({llm.n_ctx()} tokens)",
                              hint="load with a larger n_ctx, e.g. engine.load(name, n_ctx=8192)")
        llm.reset()  # no reuse of an earlier prompt's cache: the same prompt gives the same tokens
        produced = 0
        for token in llm.generate(ids, min_p=0.0, typical_p=1.0,
                                  repeat_penalty=sampling.repetition_penalty or 1.0, reset=False, **knobs):
            produced += 1
            yield int(token)
            if token in self.eos_token_ids or produced >= min(sampling.max_new_tokens, room):
                return

    def logits(self, ids: list[int]) -> Any:
        """All positions' logits, from a second context over the same loaded weights (_Scorer)."""
        if self._scorer is None or self._scorer.n_ctx < len(ids):
            if self._scorer is not None:
                self._scorer.close()
            self._scorer = _Scorer(self.native, max(len(ids), 512))
        return self._scorer.logits(ids)


class _Scorer:
    """A llama.cpp context with every position's logits, made on the generation Llama's model.

    Not a second `Llama` on the same file: llama.cpp copies (repacks) the weights into the loading
    process's own memory, so a second load held them twice (8.1 GB instead of 3.4 GB anonymous while
    scoring a Llama-3-8B-shaped Q4_K_M). The batch is decoded in one ubatch, as `Llama.eval` does with
    n_batch = n_ubatch = n_ctx and logits_all, so the logits are the same numbers
    (tests/test_runtime_llamacpp.py). Uses llama-cpp-python's internals (LlamaContext, LlamaBatch),
    pinned with the runtime's extra.
    """

    def __init__(self, llm: Any, n_ctx: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)  # threads etc. as loaded
        params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
        self.n_ctx, self.n_vocab = n_ctx, llm.n_vocab()
        self._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
        self._batch = _internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=n_ctx, verbose=False)

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        self._ctx.kv_cache_clear()
        self._batch.set_batch(batch=ids, n_past=0, logits_all=True)
        self._ctx.decode(self._batch)
        flat = np.ctypeslib.as_array(self._ctx.get_logits(), shape=(len(ids) * self.n_vocab,))
        return flat.reshape(len(ids), self.n_vocab).astype(np.float32, copy=True)

    def close(self) -> None:
        self._batch.close()
        self._ctx.close()


def _ctx_train(path: Path) -> int | None:
    from .gguf_info import GgufInvalid, read_info

    try:
        return read_info(path, tensors=False).get("context_length")
    except GgufInvalid:
        return None
