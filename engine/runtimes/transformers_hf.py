"""Runtime `transformers`: a Hugging Face checkpoint in compressed-tensors format, made by llm-compressor.

Build: llm-compressor's `oneshot` (GPTQModifier / AWQModifier / QuantizationModifier for RTN) in the
runtime's own build environment (engine.buildenv; llm-compressor needs transformers 5.15-5.17, the
engine's environment holds 5.2-5.5), as a child process (engine/runtimes/transformers_build.py).
The artifact is a plain Hugging Face folder: config.json carries `quantization_config`
(quant_method compressed-tensors, format pack-quantized), so `AutoModelForCausalLM.from_pretrained`
loads it wherever compressed-tensors is installed, and vLLM and SGLang serve it on GPU.
Load: transformers + compressed-tensors in the engine's environment, on CPU (compressed-tensors
decompresses the packed weights to fp32 at load: smaller on disk, no CPU speed gain).

Mapping: weight_dtype int4 / int8 -> num_bits 4 / 8 (W4A16 / W8A16: weights only, activations float);
group_size -> strategy group + group_size, -1 -> strategy channel; scheme -> symmetric;
skip_modules -> ignore (lm_head is always ignored, as llm-compressor's own examples do);
algorithm gptq / awq / rtn -> GPTQModifier / AWQModifier / QuantizationModifier.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..buildenv import BuildEnv, env_description
from ..calibration import calibration_key, load_texts
from ..errors import EngineError
from ..recipe.schemas import load_schema
from ..runtime import Model, Progress, Runtime, Section
from ..subproc import run_job
from .transformers_model import TransformersModel, set_torch_threads

BITS = {"int4": 4, "int8": 8}
MODIFIERS = {"gptq": "GPTQModifier", "awq": "AWQModifier", "rtn": "QuantizationModifier"}
BUILD_ENV = BuildEnv("transformers-build", Path(__file__).parent / "requirements" / "transformers-build.txt")
SERVING = ("transformers (AutoModelForCausalLM.from_pretrained, with compressed-tensors installed), "
           "vLLM and SGLang (GPU) read this folder as it is")


class TransformersRuntime(Runtime):
    name = "transformers"
    extra = "transformers"
    distributions = ("torch", "compressed-tensors", "transformers", "safetensors")
    devices = ("cpu",)
    weight_dtypes = tuple(BITS)
    algorithms = tuple(MODIFIERS)
    load_options = {"num_threads": "torch intra-op threads"}
    example_quantization = {"weight_dtype": "int8", "group_size": -1}
    step_version = 1
    hidden_meta = ("quantization_config", "build_env", "scheme")
    build_env = BUILD_ENV
    artifact_format = "hf"

    def schema_document(self) -> dict:
        return load_schema("runtimes/transformers")

    def build_params(self, recipe: dict, base_dir: Path, source: Any) -> dict:
        quant = recipe["quantization"]
        ignore = sorted(set(quant["skip_modules"]) | {"lm_head"})
        params: dict[str, Any] = {
            "precision": quant["weight_dtype"], "algorithm": quant["algorithm"],
            "modifier": MODIFIERS[quant["algorithm"]], "bits": BITS[quant["weight_dtype"]],
            "group_size": quant["group_size"], "symmetric": quant["scheme"] == "sym", "ignore": ignore,
        }
        if quant["algorithm"] != "rtn":  # the schema requires calibration for gptq/awq and refuses it for rtn
            params["calibration"] = calibration_key(quant["calibration"], base_dir)
            params["_calibration"] = quant["calibration"]
            params["_base_dir"] = str(base_dir)
        return params

    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path, progress: Progress) -> dict:
        python = params.get("_build_python")
        if not python:
            raise EngineError("runtime transformers builds in its own environment, and none was given",
                              hint="build through `engine apply`, which creates it under the store")
        job = {"source_dir": str(source_dir), "out_dir": str(out_dir), "algorithm": params["algorithm"],
               "bits": params["bits"], "group_size": params["group_size"], "symmetric": params["symmetric"],
               "ignore": params["ignore"]}
        if "_calibration" in params:
            job["calibration_texts"] = load_texts(params["_calibration"], Path(params["_base_dir"]))
            job["seq_len"] = params["calibration"]["seq_len"]
        result = run_job("engine.runtimes.transformers_build", job, logs_dir, on_line=progress, python=python,
                         env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                              "TOKENIZERS_PARALLELISM": "false"},
                         what="transformers quantization (llm-compressor oneshot)")
        env = env_description(Path(python))
        return {"implementation": "llmcompressor", "serving": SERVING,
                "implementation_version": (result.get("build_versions") or {}).get("llmcompressor"),
                "build_env": {"folder": str(Path(python).parent.parent), "lock": env.get("lock"),
                              "bytes": env.get("bytes")},
                "weights_bytes": _weights_bytes(out_dir), "source_weights_bytes": _weights_bytes(source_dir),
                **result}

    def show_sections(self, meta: dict) -> list[Section]:
        qc = meta.get("quantization_config") or {}
        if not qc:
            return []
        group = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        rows = [["quant_method", qc.get("quant_method")], ["format", qc.get("format")],
                ["compressed-tensors", qc.get("version")], ["modifier", meta.get("modifier")],
                ["num_bits", group.get("num_bits")], ["strategy", group.get("strategy")],
                ["group_size", group.get("group_size")], ["symmetric", group.get("symmetric")],
                ["ignore", ", ".join(qc.get("ignore") or []) or "-"],
                ["built with", ", ".join(f"{k} {v}" for k, v in (meta.get("build_versions") or {}).items())],
                ["build environment", (meta.get("build_env") or {}).get("folder")]]
        return [Section("compressed-tensors checkpoint (llm-compressor)", ("setting", "value"), rows)]

    def weight_precisions(self, artifact_dir: Path) -> list:
        """From the safetensors header: packed layers (weight_packed / weight) with the config's bits and
        group; the other 2-D weights by their stored dtype."""
        import json

        from ..precision import WeightPrecision

        config = json.loads((artifact_dir / "config.json").read_text(encoding="utf-8"))
        qc = config.get("quantization_config") or {}
        weights = next(iter((qc.get("config_groups") or {}).values()), {}).get("weights") or {}
        bits, group = weights.get("num_bits"), weights.get("group_size")
        names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16"}
        out = []
        for file in sorted(artifact_dir.glob("*.safetensors")):
            header = _safetensors_header(file)
            packed = {k[: -len(".weight_packed")] for k in header if k.endswith(".weight_packed")}
            scaled = {k[: -len(".weight_scale")] for k in header if k.endswith(".weight_scale")}
            for layer in sorted(packed | scaled):
                out.append(WeightPrecision(layer, f"int{bits}", group if isinstance(group, int) and group > 0 else None))
            for key, info in header.items():
                if key.endswith(".weight") and len(info.get("shape", [])) >= 2 and key[: -len(".weight")] not in scaled:
                    out.append(WeightPrecision(key, names.get(info.get("dtype"), str(info.get("dtype")).lower())))
        return out

    def open(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        """Options: num_threads (torch intra-op threads)."""
        import torch

        set_torch_threads(options)
        try:
            import compressed_tensors  # noqa: F401 - transformers needs it to read quantization_config
        except ImportError:
            raise EngineError("loading a compressed-tensors checkpoint needs the compressed-tensors package",
                              hint="pip install 'engine[transformers]'") from None
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(artifact_dir, dtype=torch.float32, device_map="cpu")
        model.eval()
        return TransformersHFModel(info, model, AutoTokenizer.from_pretrained(artifact_dir))


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))


def _safetensors_header(path: Path) -> dict:
    import json
    import struct

    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


class TransformersHFModel(TransformersModel):
    """A compressed-tensors checkpoint loaded by transformers on CPU; `native` is the torch module."""

    def logits(self, ids: list[int]) -> Any:
        import numpy as np
        import torch

        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = self.native(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return np.asarray(out.logits[0].float(), dtype=np.float32)
