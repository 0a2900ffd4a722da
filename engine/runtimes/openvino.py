"""Runtime `openvino`: OpenVINO IR exported by optimum-intel, weights compressed by NNCF.

The export + compression runs as a child process (`python -m engine.runtimes.openvino_build`)
whose output goes to the step's build log, with its temporary files inside the step's staging
folder. What the child gets is decided here, cheaply and before any work: the exact
OVWeightQuantizationConfig arguments (they are the build key), a group size that cannot divide a
layer's input width is refused naming the layers, and skip_modules entries are checked against the
checkpoint's weight names. `ov_config` is a load-time setting: it never enters the build key; it is
read from the recorded recipe at load and can be overridden by `engine.load(name, ov_config=...)`.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import struct
from pathlib import Path
from typing import Any

from ..calibration import calibration_key, load_texts
from ..embedding import EmbeddingModel
from ..errors import BuildFailed, EngineError, RecipeInvalid, RecipeIssue, RuntimeUnavailable
from ..recipe.schemas import load_schema
from ..runtime import Model, Progress, Runtime
from ..subproc import run_job
from ..tasks import DEFAULT_TASK, task_of
from .transformers_model import Seq2SeqModel, TransformersModel

_DTYPE = {"int4": "int4", "int4_clip": "int4", "int8": "int8", "nf4": "nf4", "mxfp4": "mxfp4",
          "fp16": "fp16", "fp32": "fp32"}
_UNCOMPRESSED = ("fp16", "fp32")
#: quantization.compute_dtype -> load-time OpenVINO properties (ov_config entries win)
_COMPUTE = {
    "fp32": {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"},
    "fp16": {"INFERENCE_PRECISION_HINT": "f16"},
    "bf16": {"INFERENCE_PRECISION_HINT": "bf16"},
    "int8": {"INFERENCE_PRECISION_HINT": "f32"},
}
#: recipe task -> optimum's export task (the build key's "task"; openvino_build.MODEL_CLASSES)
_EXPORT_TASK = {"text-generation": "text-generation-with-past", "feature-extraction": "feature-extraction",
                "text2text-generation": "text2text-generation-with-past"}
_GROUPS = (16, 32, 64, 128, 256, 512, 1024)


class LoadFailed(EngineError, RuntimeError):
    """OpenVINO could not compile the variant with the requested device/properties."""


def module_pattern(module: str) -> str:
    """PyTorch module name -> NNCF ignored-scope regex over the IR's node names.

    optimum-intel's exporter names every node after the module that produced it:
    `lm_head` -> `__module.lm_head/aten::linear/MatMul`. The pattern matches the module and
    everything inside it (`model.layers.0` covers the whole first block).
    """
    return rf"__module\.{re.escape(module)}(\.|/)"


# -- cheap checks on the source's config.json and weight names (no heavy imports) ---------------
def layer_widths(config: dict, all_layers: bool) -> dict[str, int]:
    """Input width (NNCF's reduction axis) of each layer whose group size NNCF checks."""
    try:
        hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
        layers, heads = int(config["num_hidden_layers"]), int(config["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        return {}  # not a Llama/Phi-style config: NNCF itself will check
    if config.get("model_type") in ("bert", "t5"):  # other layer names: NNCF itself will check
        return {}
    head_dim = int(config.get("head_dim") or hidden // heads)
    fused = config.get("model_type") == "phi3"
    attn = ("qkv_proj",) if fused else ("q_proj", "k_proj", "v_proj")
    mlp = ("gate_up_proj",) if fused else ("gate_proj", "up_proj")
    widths: dict[str, int] = {}
    for i in range(layers):
        prefix = f"model.layers.{i}"
        widths.update({f"{prefix}.self_attn.{name}": hidden for name in attn})
        widths[f"{prefix}.self_attn.o_proj"] = heads * head_dim
        widths.update({f"{prefix}.mlp.{name}": hidden for name in mlp})
        widths[f"{prefix}.mlp.down_proj"] = inter
    if all_layers:  # otherwise embeddings and lm_head get the per-channel backup precision
        widths.update({"model.embed_tokens": hidden, "lm_head": hidden})
    return widths


def _skipped(name: str, skip: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in skip)


def group_size_issue(config: dict, params: dict) -> RecipeIssue | None:
    """The layers whose input width the group size does not divide (when NNCF would refuse)."""
    qc = params.get("config") or {}
    group = qc.get("group_size", -1)
    if group == -1 or qc.get("group_size_fallback", "error") != "error" or qc.get("bits") == 8:
        return None
    widths = layer_widths(config, bool(qc.get("all_layers")))
    skip = params.get("skip_modules", [])
    bad = {n: w for n, w in widths.items() if w % group and not _skipped(n, skip)}
    if not bad:
        return None
    groups: dict[tuple[str, int], int] = {}
    for name, width in bad.items():
        generic = re.sub(r"^model\.layers\.\d+\.", "model.layers.*.", name)
        groups[(generic, width)] = groups.get((generic, width), 0) + 1
    listed = ", ".join(f"{n} (input width {w}{f', {c} layers' if c > 1 else ''})" for (n, w), c in groups.items())
    divisor = math.gcd(*widths.values())
    fits = [g for g in _GROUPS if divisor % g == 0]
    hint = (f"use a group_size that divides every layer width ({', '.join(map(str, fits[-3:]))})" if fits
            else "use group_size: -1 (per channel)")
    hint += ("; or set target.options.group_size_fallback: adjust (NNCF lowers the group size of those "
             "layers) or ignore (they stay uncompressed)")
    message = (f"{group} does not divide the input width of {len(bad)} layer(s) of this model: {listed}")
    return RecipeIssue(f"recipe '{params['_name']}'", 0, 0, "quantization.group_size", message, hint)


def weight_names(folder: Path) -> list[str]:
    """Tensor names of a safetensors checkpoint, from the index or the file headers only."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    names: list[str] = []
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            names += [k for k in json.loads(handle.read(length)) if k != "__metadata__"]
    return sorted(names)


def skip_modules_issue(folder: Path, config: dict, params: dict) -> RecipeIssue | None:
    """skip_modules entries that name no module of the checkpoint (they would silently skip nothing)."""
    skip = params.get("skip_modules", [])
    names = weight_names(folder) if skip else []
    if not names:
        return None
    if config.get("tie_word_embeddings"):  # lm_head reuses the embedding: no tensor of its own
        names.append("lm_head.weight")
    missing = [m for m in skip if not any(n.startswith(m + ".") for n in names)]
    if not missing:
        return None
    modules = sorted({n.rsplit(".", 1)[0] for n in names})
    shown = [m for m in modules if not re.match(r"model\.layers\.[1-9]", m)]
    return RecipeIssue(f"recipe '{params['_name']}'", 0, 0, "quantization.skip_modules",
                       "no module of this model is named " + ", ".join(f"'{m}'" for m in missing),
                       "modules with weights: " + ", ".join(shown[:16]) + (" ..." if len(shown) > 16 else ""))


def _refuse(issues: list[RecipeIssue | None]) -> None:
    found = [i for i in issues if i is not None]
    if found:
        raise RecipeInvalid(found)


# -- ov_config -----------------------------------------------------------------------------------
def _ov_config_schema() -> dict:
    from ..recipe.schemas import load_schema

    options = load_schema("runtimes/openvino")["properties"]["target"]["properties"]["options"]
    return {**options["properties"]["ov_config"], "$defs": load_schema("runtimes/openvino")["$defs"]}


def check_ov_config(ov_config: Any, where: str) -> None:
    """Refuse unknown OpenVINO properties or bad values (used for engine.load(..., ov_config=))."""
    import difflib

    from jsonschema import Draft202012Validator

    schema = _ov_config_schema()
    if not isinstance(ov_config, dict):
        raise RecipeInvalid([RecipeIssue(where, 0, 0, "ov_config", "expected a mapping of OpenVINO properties")])
    known = list(schema["properties"])
    issues = []
    for key in ov_config:
        if key not in known:
            close = difflib.get_close_matches(str(key).upper(), known, n=1, cutoff=0.75)
            issues.append(RecipeIssue(where, 0, 0, f"ov_config.{key}", f"unknown OpenVINO property '{key}'",
                                      f"did you mean '{close[0]}'?" if close else "known: " + ", ".join(known)))
    if not issues:
        for error in Draft202012Validator(schema).iter_errors(ov_config):
            path = ".".join(str(p) for p in error.absolute_path)
            issues.append(RecipeIssue(where, 0, 0, f"ov_config.{path}", f"{error.instance!r} is not valid here"))
    if issues:
        raise RecipeInvalid(issues)


def _as_property(value: Any) -> str:
    if isinstance(value, bool):
        return "YES" if value else "NO"
    return str(value)


def _readable(value: Any) -> str:
    """A compiled model's property value as the string one would write in ov_config."""
    if hasattr(value, "to_string"):  # openvino.Type
        return value.to_string()
    if isinstance(value, bool):
        return "YES" if value else "NO"
    if hasattr(value, "name") and not isinstance(value, (str, int)):  # property enums
        return value.name
    return str(value)


def _compressed_bytes(facts: Any, precision: str, config: dict) -> int:
    """Bytes of NNCF's compressed weights (the IR's .bin, about): int8 one byte a weight; 4-bit half a
    byte plus an fp16 scale per group in the decoder layers (`ratio` of them; the rest, and the
    embeddings and lm_head unless all_layers, at the 8-bit backup precision)."""
    if precision == "int8":
        return facts.params
    group = config.get("group_size", 128)
    four = 0.5 + (2 / group if group and group > 0 else 0)
    body = facts.params if config.get("all_layers") else facts.params - facts.outer_params
    ratio = float(config.get("ratio", 1.0))
    backup = 2 if config.get("backup_precision") == "none" else 1
    return int(four * ratio * body + backup * ((1 - ratio) * body + facts.params - body))


class OpenVINORuntime(Runtime):
    name = "openvino"
    extra = "openvino"
    distributions = ("optimum-intel", "optimum", "openvino", "openvino-tokenizers", "nncf",
                     "transformers", "torch")
    devices = ("cpu", "gpu")
    tasks = ("text-generation", "text2text-generation", "feature-extraction")
    weight_dtypes = ("int8", "int4", "int4_clip", "nf4", "mxfp4", "fp16", "fp32")
    algorithms = ("rtn", "awq", "gptq")
    load_options = {"ov_config": "OpenVINO properties, over the recipe's target.options.ov_config"}
    example_quantization = {"weight_dtype": "int8", "scheme": "asym", "group_size": -1}
    step_version = 1

    def schema_document(self) -> dict:
        return load_schema("runtimes/openvino")

    def build_params(self, recipe: dict, base_dir: Path, source: Any) -> dict:
        quant, target = recipe.get("quantization", {}), recipe["target"]
        options = target.get("options", {})
        precision = _DTYPE[quant["weight_dtype"]]
        task = task_of(recipe)
        params: dict[str, Any] = {
            "precision": precision,
            "task": _EXPORT_TASK[task],
            "openvino_tokenizer": options.get("convert_tokenizer", task == DEFAULT_TASK),
            "_name": recipe["name"],
        }
        if precision in _UNCOMPRESSED:
            return params
        skip = sorted(quant.get("skip_modules", []))
        if precision == "int8":
            config: dict[str, Any] = {"bits": 8, "dtype": "int8", "sym": quant["scheme"] == "sym",
                                      "group_size": -1, "ratio": 1.0}
        else:
            config = {
                "bits": 4, "dtype": precision, "sym": quant["scheme"] == "sym",
                "group_size": quant["group_size"], "ratio": float(options.get("ratio", 1.0)),
                "backup_precision": options.get("backup_precision", "int8_asym"),
                "all_layers": options.get("all_layers", False),
                "quant_method": "awq" if quant["algorithm"] == "awq" else "default",
                "scale_estimation": options.get("scale_estimation", False),
                "gptq": quant["algorithm"] == "gptq",
                "group_size_fallback": options.get("group_size_fallback", "error"),
            }
        if skip:
            config["ignored_scope"] = {"patterns": [module_pattern(m) for m in skip], "validate": True}
        params.update(config=config, skip_modules=skip)
        calibration = quant.get("calibration")
        if calibration:
            params["calibration"] = calibration_key(calibration, base_dir)
            params["_calibration"] = calibration
            params["_base_dir"] = str(base_dir)
        source_config, folder = source.config(), source.local_folder()
        _refuse([group_size_issue(source_config, params) if source_config else None,
                 skip_modules_issue(folder, source_config, params) if folder else None])
        return params

    def check_available(self, recipe: dict) -> None:
        if recipe["target"]["device"] != "gpu":
            return
        import openvino as ov

        devices = ov.Core().available_devices
        if not any(d.startswith("GPU") for d in devices):
            raise RuntimeUnavailable(
                f"target.device 'gpu': OpenVINO sees no GPU on this machine (devices: {', '.join(devices)})",
                hint="use `device: cpu`, or build on a machine with an Intel GPU and its compute runtime "
                     "(intel-opencl-icd / level-zero)",
            )

    def build_memory(self, facts: Any, params: dict) -> Any:
        """optimum-intel (2.2) exports a checkpoint whose config says bf16/fp16 from the 16-bit model
        (its own 16-bit patching; the weights stay mapped from the safetensors), so what the build owns
        is the interpreter plus the larger of NNCF's compressed constants (they accumulate) and the
        temporaries of compressing the largest tensor (NNCF starts with the largest: the embeddings or
        lm_head, ~11 bytes a weight). Measured at Phi-3.5-mini's widths with 2, 4, 8 and 32 layers
        (0.42 to 3.82 B) and Llama-3-8B's with 2 (1.49 B), int4 and int8: docs/memory.md. Data-aware
        algorithms also run the model on the calibration texts: AWQ (and, assumed alike, scale
        estimation and a calibrated mixed precision) + 1 byte a parameter, GPTQ + 1.6 GB + 2.5 bytes a
        parameter, each fitted to two builds at Phi-3.5-mini's widths (2 and 4 layers) only."""
        from ..memory import GB, TORCH_BASE, Estimate

        precision = params.get("precision", "int8")  # no params (another recipe's hint): the larger
        if precision in _UNCOMPRESSED:
            return Estimate(TORCH_BASE + 4 * facts.params, facts.stored_bytes,
                            f"{precision} IR from the 16-bit export (not measured)")
        config = params.get("config", {})
        largest = max(facts.embed_params or facts.outer_params // 2, facts.layer_params // 2)
        anonymous = TORCH_BASE + max(_compressed_bytes(facts, precision, config), 11 * largest)
        note = "16-bit export; compressed weights or the largest tensor's temporaries (measured)"
        if config.get("gptq"):  # measured 4.17 and 4.70 GB at 0.42 and 0.65 B (RTN: ~1.4)
            anonymous += int(1.6 * GB + 2.5 * facts.params)
            note = "16-bit export + GPTQ's layer-wise statistics (fitted at 0.42-0.65 B only)"
        elif params.get("calibration") or config.get("quant_method") == "awq" or config.get("scale_estimation"):
            anonymous += facts.params  # AWQ measured 1.85 and 1.96 GB at 0.42 and 0.65 B
            note = "16-bit export + activation statistics (fitted at 0.42-0.65 B only)"
        return Estimate(anonymous, facts.stored_bytes, note)

    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path,
              progress: Progress) -> dict:
        config_path = source_dir / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        _refuse([group_size_issue(config, params), skip_modules_issue(source_dir, config, params)])
        job: dict[str, Any] = {"source": str(source_dir), "out": str(out_dir),
                               "params": {k: v for k, v in params.items() if not k.startswith("_")}}
        if params.get("_calibration"):
            job["texts"] = self._calibration_texts(params)
        scratch = out_dir.parent / "scratch"  # the child's temporary files, inside the staging folder
        scratch.mkdir(exist_ok=True)
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TMPDIR": str(scratch),
               "TOKENIZERS_PARALLELISM": "false"}
        try:
            facts = run_job("engine.runtimes.openvino_build", job, logs_dir, env=env, on_line=progress,
                            what="OpenVINO export + NNCF weight compression")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return {"openvino_build": facts}

    @staticmethod
    def _calibration_texts(params: dict) -> list[str]:
        """The texts, re-checked against the hash in the key (the file may change after planning)."""
        base_dir = Path(params["_base_dir"])
        if calibration_key(params["_calibration"], base_dir) != params["calibration"]:
            raise BuildFailed("the calibration data changed while this recipe was being applied",
                              hint="apply again: the new content gives a new key")
        return load_texts(params["_calibration"], base_dir)

    def weight_precisions(self, artifact_dir: Path) -> list:
        """Read the IR's XML (not its weights): each weight constant's element type (i4/u4: int4,
        i8/u8: int8, nf4, f4e2m1, f16, f32) and, for a [out, groups, group] constant, its group size."""
        import xml.etree.ElementTree as ET

        from ..precision import WeightPrecision

        names = {"i4": "int4", "u4": "int4", "i8": "int8", "u8": "int8", "nf4": "nf4", "f4e2m1": "mxfp4",
                 "f16": "fp16", "bf16": "bf16", "f32": "fp32"}
        out = []
        from .openvino_build import ir_files

        layers = [layer for xml in ir_files(artifact_dir) for layer in ET.parse(xml).getroot().iter("layer")]
        for layer in layers:
            data, name = layer.find("data"), layer.get("name", "")
            if layer.get("type") != "Const" or data is None or not name.endswith("weight"):
                continue
            shape = [int(x) for x in (data.get("shape") or "").split(",") if x.strip()]
            kind = names.get(data.get("element_type", ""))
            if kind and len(shape) >= 2:  # 1-d: norms and biases, not weights
                grouped = len(shape) == 3 and kind not in ("fp16", "bf16", "fp32")
                out.append(WeightPrecision(name, kind, shape[-1] if grouped else None))
        return out

    def open(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        override = options.pop("ov_config", None)
        recipe = info.recipe
        target = recipe.get("target", {})
        recorded = target.get("options", {}).get("ov_config", {})
        if override is not None:
            check_ov_config(override, "engine.load(ov_config=...)")
        compute = recipe.get("quantization", {}).get("compute_dtype", "fp32")
        ov_config = {**_COMPUTE[compute], **recorded, **(override or {})}
        device = target.get("device", "cpu").upper()
        if device == "GPU":
            ov_config.setdefault("CACHE_DIR", "")  # optimum-intel would write a cache into the artifact
        ov_config = {k: _as_property(v) for k, v in ov_config.items()}
        import optimum.intel
        from transformers import AutoTokenizer

        from .openvino_build import MODEL_CLASSES

        task = task_of(recipe)
        model_class = getattr(optimum.intel, MODEL_CLASSES[_EXPORT_TASK[task]])
        try:
            native = model_class.from_pretrained(str(artifact_dir), export=False, device=device, ov_config=ov_config)
        except RuntimeError as error:  # OpenVINO's compile errors: bad property value, missing device
            first = str(error).strip().splitlines()
            raise LoadFailed(f"OpenVINO could not compile {info.name} for {device}: "
                             f"{first[-1] if first else error}",
                             hint=f"ov_config in effect: {json.dumps(ov_config, sort_keys=True)}") from None
        tokenizer = AutoTokenizer.from_pretrained(str(artifact_dir))
        if task == "feature-extraction":
            return OpenVINOEmbedder(info, native, tokenizer)
        if task == "text2text-generation":
            return OpenVINOSeq2Seq(info, native, tokenizer)
        return OpenVINOModel(info, native, tokenizer, ov_config)


class OpenVINOModel(TransformersModel):
    """An optimum-intel OVModelForCausalLM (a stateful IR) behind the transformers generate API."""

    #: Prompts run one after another, not as one batch.
    #:
    #: With optimum-intel 2.2 + transformers 5, a batched generate on the stateful IR that follows
    #: an earlier, longer generate call ends some rows early with an EOS the single run never
    #: produces (even for equal-length prompts, with the state reset): wrong answers are worse
    #: than slower ones. tests/test_inference.py pins batch == single answers.
    batch_prompts = False

    def __init__(self, info: dict, native: Any, tokenizer: Any, ov_config: dict) -> None:
        super().__init__(info, native, tokenizer)
        self.requested_ov_config = ov_config

    @property
    def ov_config(self) -> dict[str, str]:
        """The requested properties as the compiled model reports them (proof they are in effect)."""
        compiled = self.native.request.get_compiled_model()
        return {key: _readable(compiled.get_property(key)) for key in self.requested_ov_config}

    def logits(self, ids: list[int]) -> Any:
        import numpy as np
        import torch

        input_ids = torch.tensor([ids], dtype=torch.long)
        with torch.no_grad():  # no past_key_values: optimum-intel resets the stateful KV cache
            out = self.native(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        logits = np.asarray(out.logits[0], dtype=np.float32)
        if logits.shape[0] != len(ids):
            raise EngineError(f"OpenVINO returned logits for {logits.shape[0]} of {len(ids)} positions")
        return logits


class OpenVINOEmbedder(EmbeddingModel):
    """An optimum-intel OVModelForFeatureExtraction: the IR's last_hidden_state, pooled by the engine."""

    def token_states(self, input_ids: Any, attention_mask: Any) -> Any:
        import numpy as np

        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.native.input_names:
            inputs["token_type_ids"] = np.zeros_like(input_ids)
        return np.asarray(self.native(**inputs).last_hidden_state)


class OpenVINOSeq2Seq(Seq2SeqModel):
    """An optimum-intel OVModelForSeq2SeqLM (encoder + decoder IR) behind the transformers generate API."""
