"""Runtime `itrex`: Intel weight-only quantization with the ITREX vocabulary, on Intel Neural Compressor 3.x.

intel-extension-for-transformers (ITREX) is archived and no longer runs on current torch; its
`WeightOnlyQuantConfig` knobs are mapped onto its maintained successor, Intel Neural Compressor 3.x
(`neural-compressor-pt`, low-level API `neural_compressor.torch.quantization`): RTN, AWQ, TEQ and
GPTQ configs, `prepare`/`convert`, `model.save`, `load`. Quantization runs in a child process
(engine/runtimes/itrex_build.py); loading and generation run in PyTorch on the CPU.

Mapping (docs/itrex.md has the full table and what is refused):
    weight_dtype int8 -> dtype "int", bits 8; int4 / int4_clip -> "int", 4, use_full_range False;
    int4_fullrange -> "int", 4, use_sym True, use_full_range True; nf4 -> "nf4"; fp4_e2m1 -> "fp4_e2m1"
    scheme -> use_sym; group_size -> group_size; mse_range -> use_mse_search
    skip_modules -> set_local(<layer>, XConfig(dtype="fp32")); lm_head stays fp32 as in ITREX
    compute_dtype fp32 and scale_dtype fp16 (int) / fp32 (nf4, fp4): the only values INC honours without IPEX
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from ..calibration import calibration_key, load_texts
from ..embedding import TorchEmbedder
from ..recipe.schemas import load_schema
from ..runtime import Model, Progress, Runtime, Section
from ..subproc import run_job
from ..tasks import DEFAULT_TASK, task_of
from .transformers_model import Seq2SeqModel, TransformersModel, set_torch_threads

#: ITREX weight_dtype -> INC (dtype, bits, use_full_range)
DTYPES: dict[str, tuple[str, int, bool]] = {
    "int8": ("int", 8, False),
    "int4": ("int", 4, False),
    "int4_clip": ("int", 4, False),
    "int4_fullrange": ("int", 4, True),
    "nf4": ("nf4", 4, False),
    "fp4_e2m1": ("fp4_e2m1", 4, False),
}
INC_CLASS = {"rtn": "RTNConfig", "awq": "AWQConfig", "teq": "TEQConfig", "gptq": "GPTQConfig"}
TEQ_DEFAULTS = {"steps": 100, "lr": 1e-3, "seed": 0}
NOTE = ("Without IPEX (intel-extension-for-pytorch stops at torch 2.8) INC unpacks the packed weights to fp32 "
        "at the first forward: smaller on disk, no speed or memory gain at inference. For low-bit speed on CPU "
        "use the openvino or onnxruntime-genai runtimes.")
#: the ITREX knobs, in the order `engine show` lists them
ITREX_KEYS = ("weight_dtype", "compute_dtype", "scale_dtype", "scheme", "group_size", "algorithm", "mse_range",
              "skip_modules", "use_double_quant")


def inc_settings(quant: dict) -> dict[str, Any]:
    """The INC config arguments a recipe's quantization section becomes (pure: no import)."""
    dtype, bits, full_range = DTYPES[quant["weight_dtype"]]
    algorithm = quant["algorithm"]
    settings: dict[str, Any] = {"dtype": dtype, "bits": bits, "use_sym": quant["scheme"] == "sym",
                                "group_size": quant["group_size"]}
    if algorithm != "gptq":  # GPTQ has no full-range switch (its own grid; int4_fullrange is refused)
        settings["use_full_range"] = full_range
    if algorithm != "teq":  # TEQ has no clip search (mse_range is refused)
        settings["use_mse_search"] = quant["mse_range"]
    if algorithm in ("rtn", "awq", "gptq"):
        # in the build key as it always was; the child still quantizes RTN layer by layer where it can
        # (engine/runtimes/itrex_build.py: the same bytes as the whole-model build, docs/memory.md)
        settings["use_layer_wise"] = False
    if algorithm == "awq":  # as ITREX: scale search, AWQ's own clip search, scales folded into the previous layer
        settings.update(use_auto_scale=True, use_auto_clip=True, folding=True)
    if algorithm == "teq":
        settings["folding"] = True
    settings["quant_lm_head"] = False  # ITREX kept lm_head in full precision
    return settings


def layer_wise_build(params: dict) -> bool:
    """Whether the build child quantizes layer by layer: RTN on a causal LM (INC's layer-wise mode
    makes the same bytes there, tests/test_runtime_itrex.py; its loader does not handle the encoder
    and seq2seq checkpoints, and AWQ/TEQ/GPTQ calibrate on the whole model)."""
    return params.get("algorithm", "rtn") == "rtn" and params.get("_task", DEFAULT_TASK) == DEFAULT_TASK


def packed_bytes(facts: Any, params: dict) -> int:
    """INC's packed decoder layers: the low-bit weights in int32 words, a scale per group (fp16 for
    int, fp32 for nf4/fp4), a packed zero point per group when asymmetric."""
    inc = params.get("inc") or {"dtype": "int", "bits": 4, "group_size": 32, "use_sym": True}
    group = inc["group_size"] if inc["group_size"] > 0 else max(facts.hidden_size, 1)
    per = inc["bits"] / 8 + (2 if inc["dtype"] == "int" else 4) / group
    if not inc.get("use_sym", True):
        per += inc["bits"] / 8 / group
    return int(per * (facts.params - facts.outer_params))


def mapping_rows(quant: dict) -> list[list[Any]]:
    """[ITREX name, value as written, INC name, value] for `engine show`."""
    inc = inc_settings(quant)
    dtype = f"dtype={inc['dtype']!r}, bits={inc['bits']}"
    if "use_full_range" in inc and inc["dtype"] == "int":
        dtype += f", use_full_range={inc['use_full_range']}"
    cls = INC_CLASS[quant["algorithm"]]
    storage = "fp16 (INC packs int scales as fp16)" if inc["dtype"] == "int" else "fp32"
    rows = [
        ["weight_dtype", quant["weight_dtype"], "dtype, bits", dtype],
        ["compute_dtype", quant["compute_dtype"], "-", "fp32 (INC unpacks to fp32 without IPEX)"],
        ["scale_dtype", quant.get("scale_dtype", "(not set)"), "-", storage],
        ["scheme", quant["scheme"], "use_sym", inc["use_sym"]],
        ["group_size", quant["group_size"], "group_size", inc["group_size"]],
        ["algorithm", quant["algorithm"], "config", cls],
        ["mse_range", quant["mse_range"], "use_mse_search", inc.get("use_mse_search", "-")],
        ["llm_int8_skip_modules", quant["skip_modules"], "set_local(layer, dtype='fp32')",
         sorted(quant["skip_modules"]) or "-"],
        ["(lm_head)", "full precision", "quant_lm_head", False],
        ["use_double_quant", quant["use_double_quant"], "use_double_quant", False],
    ]
    if quant["algorithm"] == "awq":
        rows.append(["(awq)", "-", "use_auto_scale, use_auto_clip, folding", "True, True, True"])
    return rows


class ItrexRuntime(Runtime):
    name = "itrex"
    extra = "itrex"
    distributions = ("neural-compressor-pt", "torch", "transformers", "safetensors")
    devices = ("cpu",)
    tasks = ("text-generation", "text2text-generation", "feature-extraction")
    weight_dtypes = tuple(DTYPES)
    algorithms = tuple(INC_CLASS)
    load_options = {"num_threads": "torch intra-op threads"}
    example_quantization = {"weight_dtype": "int8", "group_size": 32}  # scale_dtype: INC native (fp16)
    step_version = 1
    hidden_meta = ("mapping", "inc_config", "probe", "itrex")

    def schema_document(self) -> dict:
        return load_schema("runtimes/itrex")

    def show_sections(self, meta: dict) -> list[Section]:
        """The settings as the user wrote them (ITREX names) beside what Intel Neural Compressor got."""
        if not meta.get("mapping"):
            return []
        return [Section("ITREX settings -> Intel Neural Compressor",
                        ("ITREX setting", "as written", "INC setting", "became"), meta["mapping"])]

    def build_params(self, recipe: dict, base_dir: Path, source: Any) -> dict:
        quant, options = recipe["quantization"], recipe["target"].get("options", {})
        algorithm = quant["algorithm"]
        params: dict[str, Any] = {
            "precision": "int4_clip" if quant["weight_dtype"] == "int4" else quant["weight_dtype"],
            "algorithm": algorithm,
            "inc_class": INC_CLASS[algorithm],
            "inc": inc_settings(quant),
            "fp32_modules": sorted(quant["skip_modules"]),
            "_itrex": {key: quant[key] for key in ITREX_KEYS if key in quant},
            "_task": task_of(recipe),  # in the key through the plan when it is not the default
        }
        if algorithm != "rtn":  # the schema requires calibration for awq/teq/gptq and refuses it for rtn
            params["calibration"] = calibration_key(quant["calibration"], base_dir)
            params["_calibration"] = quant["calibration"]
            params["_base_dir"] = str(base_dir)
        if algorithm == "teq":
            params["teq"] = {key: options.get(f"teq_{key}", value) for key, value in TEQ_DEFAULTS.items()}
        return params

    def recipe_issues(self, recipe: Any, source: Any) -> list:
        """AWQ and TEQ absorb scales into a decoder block's norms: causal LMs only here."""
        data = recipe.data
        if task_of(data) != DEFAULT_TASK and data["quantization"]["algorithm"] in ("awq", "teq"):
            return [recipe.issue(("quantization", "algorithm"),
                                 f"itrex runs {data['quantization']['algorithm']} on causal LMs only, not on "
                                 f"task {task_of(data)}", "use algorithm rtn or gptq")]
        return []

    def build_memory(self, facts: Any, params: dict) -> Any:
        """RTN on a causal LM runs layer by layer (INC's layer-wise mode, see layer_wise_build): the
        packed layers, the unquantized embeddings and lm_head in fp32, one decoder layer in fp32 with
        its quantization temporaries; at the reload check the saved artifact is mapped as well.
        AWQ, TEQ, GPTQ and the other tasks quantize the whole fp32 model in place (packed weights
        beside it while a layer is packed)."""
        from ..memory import TORCH_BASE, Estimate

        if not layer_wise_build(params):
            return Estimate(TORCH_BASE + int(4.5 * facts.params), facts.stored_bytes,
                            "INC holds the model in fp32 (AWQ/TEQ/GPTQ and non-causal tasks: not layer-wise)")
        packed, outer = packed_bytes(facts, params), 4 * facts.outer_params
        stored_outer = facts.stored_bytes * facts.outer_params // max(facts.params, 1)
        # the peak is the reload check: INC's load reads the whole artifact into memory (packed layers
        # and the stored embeddings) and builds the packed layers beside it; quantizing peaks lower, at
        # the packed layers, the fp32 embeddings and one layer. Measured at Phi-3.5-mini's shapes.
        reload = 2 * packed + outer + stored_outer
        return Estimate(TORCH_BASE + max(reload, packed + outer + 4 * facts.layer_params), 0,
                        "RTN layer by layer: peak at the reload check (the artifact read beside the packed model)")

    def eval_memory(self, facts: Any, params: dict, window: int) -> Any:
        """Without IPEX each packed layer is unpacked at its first forward and kept. Measured at
        Phi-3.5-mini's shapes (int4, scoring 2 windows of 128 in the engine's process): 19.99 GB owned,
        i.e. the unpacked layers in fp32 beside the packed ones (twice K), the embeddings and lm_head in
        fp32 and one layer's temporaries; itrex_build.keep_unpacked_16bit did not halve it there (not
        understood: docs/memory.md)."""
        from ..memory import TORCH_BASE, Estimate, logits_bytes

        layers = facts.params - facts.outer_params
        resident = 4 * layers + 2 * packed_bytes(facts, params) + 4 * facts.outer_params + 4 * facts.layer_params
        return Estimate(TORCH_BASE + resident + logits_bytes(facts, window), 0,
                        "packed layers kept unpacked in fp32 after their first forward (no IPEX; measured)")

    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path,
              progress: Progress) -> dict:
        job = {
            "source_dir": str(source_dir), "out_dir": str(out_dir), "algorithm": params["algorithm"],
            "inc": params["inc"], "skip_modules": params["fp32_modules"], "itrex": params["_itrex"],
            "seed": params.get("teq", {}).get("seed", 0), "teq": params.get("teq"),
            "task": params.get("_task", DEFAULT_TASK), "layer_wise": layer_wise_build(params),
        }
        if "_calibration" in params:
            job["calibration_texts"] = load_texts(params["_calibration"], Path(params["_base_dir"]))
            job["seq_len"] = params["calibration"]["seq_len"]
        # a fixed mmap threshold: glibc's adaptive one keeps freed layer-sized blocks in the heap,
        # and the peak then grows with every layer unpacked or quantized instead of staying at one
        result = run_job("engine.runtimes.itrex_build", job, logs_dir, on_line=progress,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"},
                         what="itrex quantization (neural-compressor)")
        return {
            "implementation": "neural-compressor-pt", "api": "neural_compressor.torch.quantization",
            "implementation_version": metadata.version("neural-compressor-pt"),
            "mapping": mapping_rows(params["_itrex"]), "note": NOTE,
            "source_weights_bytes": _weights_bytes(source_dir),
            "weights_bytes": (out_dir / "quantized_weight.pt").stat().st_size,
            **{k: v for k, v in result.items() if k not in ("format", "itrex")},
            "itrex": params["_itrex"],
        }

    def weight_precisions(self, artifact_dir: Path) -> list:
        """Read INC's packed modules: qconfig.json gives each quantized Linear's dtype, bits and
        group; the other weights (embeddings, lm_head, skipped layers) are read from
        quantized_weight.pt's tensors (memory-mapped, their dtype as stored)."""
        import ast

        import torch

        from ..precision import WeightPrecision

        out, quantized = [], set()
        for key, algos in json.loads((artifact_dir / "qconfig.json").read_text(encoding="utf-8")).items():
            try:
                layer = ast.literal_eval(key)[0] if key.startswith("(") else key
            except (ValueError, SyntaxError):
                layer = key
            config = next((v for v in algos.values() if isinstance(v, dict)), {}) if isinstance(algos, dict) else {}
            dtype = config.get("dtype", "int")
            if dtype == "fp32":  # a skipped layer: its weight is read below with the other floats
                continue
            quantized.add(layer)
            group = config.get("group_size")
            out.append(WeightPrecision(layer, f"int{config.get('bits', 4)}" if dtype == "int" else dtype,
                                       group if isinstance(group, int) and group > 0 else None))
        names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
        state = torch.load(artifact_dir / "quantized_weight.pt", weights_only=True, mmap=True)
        for name, tensor in state.items():
            if name.endswith(".weight") and tensor.dim() >= 2 and name[: -len(".weight")] not in quantized:
                out.append(WeightPrecision(name, names.get(tensor.dtype, str(tensor.dtype).replace("torch.", ""))))
        return out

    def open(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        """Options: num_threads (torch intra-op threads)."""
        set_torch_threads(options)
        from transformers import AutoTokenizer

        from .itrex_build import load_quantized

        # INC print()s progress to stdout and logs at INFO: stdout is the user's (`engine run`)
        logging.getLogger("neural_compressor").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(sys.stderr):
            model = load_quantized(artifact_dir, task_of(info.recipe))
        tokenizer = AutoTokenizer.from_pretrained(artifact_dir)
        if task_of(info.recipe) == "feature-extraction":
            return ItrexEmbedder(info, model, tokenizer)
        if task_of(info.recipe) == "text2text-generation":
            return ItrexSeq2Seq(info, model, tokenizer)
        return ItrexModel(info, model, tokenizer)


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))


class ItrexModel(TransformersModel):
    """A quantized transformers model on CPU; `native` is the torch module (INCWeightOnlyLinear layers)."""

    def logits(self, ids: list[int]) -> Any:
        import numpy as np
        import torch

        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = self.native(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return np.asarray(out.logits[0].float(), dtype=np.float32)


class ItrexEmbedder(TorchEmbedder):
    """A quantized BERT-style encoder in PyTorch (INCWeightOnlyLinear layers), pooled by the engine."""


class ItrexSeq2Seq(Seq2SeqModel):
    """A quantized T5-style encoder-decoder in PyTorch."""
