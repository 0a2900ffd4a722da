"""Runtime `onnxruntime-genai`: the ONNX Runtime GenAI model builder, loaded with onnxruntime_genai.

The builder runs as a child process (`python -m onnxruntime_genai.models.builder`) with a scratch
cache inside the step's staging folder, offline, and its output goes to the step's build log.
"""
from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import BuildFailed, EngineError, RuntimeUnavailable
from ..progress import task
from ..recipe.schemas import load_schema
from ..runtime import Model, Progress, Runtime, Sampling
from ..subproc import run_logged

_PRECISION = {"int4": "int4", "int4_clip": "int4", "int8": "int8", "fp16": "fp16", "fp32": "fp32"}
_ACCURACY_LEVEL = {"fp32": 1, "fp16": 2, "bf16": 3, "int8": 4}
_DEVICE_PACKAGES = {"cuda": "onnxruntime-genai-cuda", "dml": "onnxruntime-genai-directml"}


def module_to_node(module: str) -> str:
    """PyTorch module name -> the builder's MatMul node name (lm_head -> /lm_head/MatMul)."""
    parts = module.split(".")
    out: list[str] = []
    for part in parts:  # the builder writes "layers.3" as one path element
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}.{part}"
        else:
            out.append(part)
    return "/" + "/".join(out) + "/MatMul"


class _BuilderStages:
    """The builder's own lines, read as it works, as engine.progress tasks: decoder layers read,
    layers quantized (MatMulNBits), tensors saved."""

    STAGES = (
        ("reading layers", re.compile(r"^Reading layer (\d+)"), "layers"),
        ("quantizing layers", re.compile(r"complete quantization of /model/layers\.(\d+)/"), "layers"),
        ("saving tensors", re.compile(r"^Saving .*\s(\d+)/(\d+) \["), "tensors"),
    )

    def __init__(self, layers: int | None) -> None:
        self.layers = layers
        self.current = None

    def hear(self, line: str) -> None:
        for name, pattern, unit in self.STAGES:
            found = pattern.search(line)
            if not found:
                continue
            stage = f"onnxruntime-genai builder: {name}"
            if self.current is None or self.current.stage != stage:
                self.finish()
                total = int(found.group(2)) if pattern.groups > 1 else self.layers
                self.current = task(stage, total, unit)
            self.current.update(int(found.group(1)) + (0 if pattern.groups > 1 else 1))
            return

    def finish(self) -> None:
        if self.current is not None:
            self.current.finish()
            self.current = None


def _layer_count(source_dir: Path) -> int | None:
    """The decoder layers the builder will read (config.json), for its progress."""
    try:
        config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
        return int((config.get("text_config") or config)["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class OrtGenAIRuntime(Runtime):
    name = "onnxruntime-genai"
    extra = "ortgenai"
    distributions = ("onnxruntime-genai", "onnxruntime", "onnx", "onnx-ir", "transformers", "torch")
    devices = ("cpu", "cuda", "dml")
    weight_dtypes = ("int4", "int4_clip", "int8", "fp16", "fp32")
    algorithms = ("rtn",)
    load_options = {"num_threads": "intra-op threads", "providers": "execution providers, in order"}
    example_quantization = {"weight_dtype": "int4", "group_size": 32}
    step_version = 1

    def defaults(self, recipe: dict) -> dict[str, Any]:
        """int4/int8 weights on CPU: compute_dtype int8 (MatMulNBits accuracy level 4, int8
        activations), the builder's own CPU default: about 2x the decode speed of level 1 for ~1%
        more KL on wt2-phi3-7m (docs/onnxruntime-genai.md). Elsewhere fp32 (level 1), as before."""
        quant, target = recipe.get("quantization", {}), recipe.get("target", {})
        low_bit = _PRECISION.get(quant.get("weight_dtype", "")) in ("int4", "int8")
        return {"quantization.compute_dtype": "int8" if low_bit and target.get("device", "cpu") == "cpu" else "fp32"}

    def schema_document(self) -> dict:
        return load_schema("runtimes/onnxruntime-genai")

    def build_params(self, recipe: dict, base_dir: Path, source: Any) -> dict:
        quant, target = recipe.get("quantization", {}), recipe["target"]
        precision = _PRECISION[quant["weight_dtype"]]
        params: dict[str, Any] = {"precision": precision, "execution_provider": target["device"]}
        if precision in ("int4", "int8"):
            options = target.get("options", {})
            params.update(
                block_size=quant["group_size"],
                is_symmetric=quant["scheme"] == "sym",
                accuracy_level=options.get("accuracy_level", _ACCURACY_LEVEL[quant["compute_dtype"]]),
                nodes_to_exclude=sorted(module_to_node(m) for m in quant["skip_modules"]),
            )
        return params

    def run_failure_hint(self, message: str, source_dir: Path) -> str | None:
        """onnxruntime's GroupQueryAttention needs head_size % 16 == 0 (stories260K has 8)."""
        if "head_size" in message:
            try:
                config = json.loads((source_dir / "config.json").read_text(encoding="utf-8"))
                size = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
                said = f" (this model: {size})"
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
                said = ""
            return (f"onnxruntime's attention kernel needs a head size that is a multiple of 16{said}; "
                    "runtimes that run such a model: openvino, itrex")
        return super().run_failure_hint(message, source_dir)

    def weight_precisions(self, artifact_dir: Path) -> list:
        """Read the ONNX graph (not its weights): MatMulNBits bits and block_size, the initializer
        type of plain MatMul / Gather weights, GatherBlockQuantized embeddings."""
        import onnx

        from ..precision import WeightPrecision

        graph = onnx.load(str(artifact_dir / "model.onnx"), load_external_data=False).graph
        types = {i.name: i.data_type for i in graph.initializer}
        floats = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
                  onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8"}
        out = []
        for node in graph.node:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if node.op_type in ("MatMulNBits", "GatherBlockQuantized"):
                out.append(WeightPrecision(node.name, f"int{attrs.get('bits', 4)}", attrs.get("block_size")))
            elif node.op_type in ("MatMul", "Gather") and len(node.input) > 1:
                weight = next((i for i in node.input if i in types), None)
                if weight is not None:
                    out.append(WeightPrecision(node.name, floats.get(types[weight], str(types[weight]))))
        return out

    def check_available(self, recipe: dict) -> None:
        device = recipe["target"]["device"]
        package = _DEVICE_PACKAGES.get(device)
        if package is None:
            return
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError:
            raise RuntimeUnavailable(
                f"target.device '{device}' needs the package '{package}', which is not installed here",
                hint=f"pip install {package} on a machine with that device, or use `device: cpu`",
            ) from None

    def build_memory(self, facts: Any, params: dict) -> Any:
        """The model builder (0.18) loads the checkpoint through transformers, whose default dtype is
        "auto": the 16-bit weights stay mapped. The copies it owns are its own: on the CPU an int4/int8
        model has fp32 inputs and outputs, so every weight is cast to fp32 as the whole ONNX model is
        turned into one protobuf for MatMulNBitsQuantizer, with the quantized tensors beside it. No
        builder option lowers this on the CPU. Measured at Phi-3.5-mini's widths with 2 to 8 layers
        (0.42 to 1.10 B params): 5.2 bytes a parameter at int4, 5.8 at int8 (fp16/fp32 not measured:
        the int8 figure is assumed), plus ~5 bytes a weight of the largest tensor (the embeddings stay
        fp32; fitted with Llama-3-8B's widths and 2 layers, 1.49 B: 10.6 GB); docs/memory.md."""
        from ..memory import TORCH_BASE, Estimate

        per = 5.2 if params.get("precision") == "int4" else 5.8  # no params (another recipe's hint): the larger
        largest = max(facts.embed_params or facts.outer_params // 2, facts.layer_params // 2)
        return Estimate(int(TORCH_BASE + per * facts.params + 5 * largest), facts.stored_bytes,
                        "builder casts the whole model to fp32 (measured)")

    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path,
              progress: Progress) -> dict:
        extra = ["hf_token=false"]
        if "block_size" in params:
            extra += [
                f"block_size={params['block_size']}",
                f"is_symmetric={str(params['is_symmetric']).lower()}",
                f"accuracy_level={params['accuracy_level']}",
            ]
            if params["nodes_to_exclude"]:
                extra.append("nodes_to_exclude=" + ",".join(params["nodes_to_exclude"]))
        scratch = out_dir.parent / "scratch"
        log = logs_dir / "build.log"
        cmd = [
            sys.executable, "-m", "onnxruntime_genai.models.builder",
            "-i", str(source_dir), "-o", str(out_dir),
            "-p", params["precision"], "-e", params["execution_provider"],
            "-c", str(scratch), "--extra_options", *extra,
        ]
        stages = _BuilderStages(_layer_count(source_dir))

        def on_line(line: str) -> None:
            stages.hear(line)
            progress(line)

        try:
            run_logged(cmd, log, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                       on_line=on_line, what="onnxruntime-genai model builder")
        finally:
            stages.finish()
        _check_exclusions(log, params.get("nodes_to_exclude", []))
        return {"builder_args": cmd[3:]}

    def open(self, artifact_dir: Path, info: Any, **options: Any) -> Model:
        """Options: num_threads (int), providers (list of execution provider names)."""
        import onnxruntime_genai as og

        config = og.Config(str(artifact_dir))
        if "num_threads" in options:
            threads = options["num_threads"]
            if not isinstance(threads, int) or threads < 1:
                raise EngineError(f"num_threads must be a positive integer, got {threads!r}")
            config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        if "providers" in options:
            config.clear_providers()
            for provider in options["providers"]:
                config.append_provider(provider)
        model = og.Model(config)
        return OrtGenAIModel(info, model, og.Tokenizer(model), og, artifact_dir)


def _check_exclusions(log: Path, nodes: list[str]) -> None:
    """A skip_modules entry that matched no node would silently quantize everything: refuse."""
    if not nodes:
        return
    text = log.read_text(encoding="utf-8", errors="replace")
    missing = [n for n in nodes if f"exclude to quantize {n} " not in text]
    if missing:
        seen = sorted(set(re.findall(r"quantize (/\S+/MatMul)", text)))
        raise BuildFailed(
            "quantization.skip_modules matched no layer for: " + ", ".join(missing),
            hint="quantizable layers in this model: " + ", ".join(seen[:12]) + (" ..." if len(seen) > 12 else ""),
        )


class OrtGenAIModel(Model):
    def __init__(self, info: Any, model: Any, tokenizer: Any, og: Any, artifact_dir: Path) -> None:
        super().__init__(info, model)
        self.tokenizer = tokenizer
        self._og = og
        config = json.loads((artifact_dir / "genai_config.json").read_text(encoding="utf-8"))
        eos = config["model"].get("eos_token_id", [])
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = int(config["model"].get("pad_token_id", min(self.eos_token_ids, default=0)))

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def _params(self, prompt_len: int, batch: int, s: Sampling) -> Any:
        params = self._og.GeneratorParams(self.native)
        search: dict[str, Any] = {"max_length": prompt_len + s.max_new_tokens, "do_sample": s.do_sample,
                                  "batch_size": batch}
        for key, value in (("temperature", s.temperature), ("top_p", s.top_p), ("top_k", s.top_k),
                           ("repetition_penalty", s.repetition_penalty), ("random_seed", s.seed)):
            if value is not None:
                search[key] = value
        params.set_search_options(**search)
        return params

    def logits(self, ids: list[int]) -> Any:
        import numpy as np

        generator = self._og.Generator(self.native, self._params(len(ids), 1, Sampling(max_new_tokens=1)))
        generator.append_tokens([ids])
        return np.asarray(generator.get_output("logits"))[0].astype(np.float32)

    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        generator = self._og.Generator(self.native, self._params(len(ids), 1, sampling))
        generator.append_tokens([ids])
        produced = 0
        while not generator.is_done() and produced < sampling.max_new_tokens:
            generator.generate_next_token()
            token = int(generator.get_next_tokens()[0])
            produced += 1
            yield token
            if token in self.eos_token_ids:
                return

    def generate_ids(self, batch: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """One batched generator; prompts right-padded with the pad id (ORT GenAI masks it)."""
        if len(batch) <= 1:
            return [list(self.stream_ids(ids, sampling)) for ids in batch]
        import numpy as np

        width = max(len(ids) for ids in batch)
        tokens = np.full((len(batch), width), self.pad_token_id, dtype=np.int32)
        for row, ids in enumerate(batch):
            tokens[row, : len(ids)] = ids
        generator = self._og.Generator(self.native, self._params(width, len(batch), sampling))
        generator.append_tokens(tokens)
        out: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        while not generator.is_done() and not all(done):
            generator.generate_next_token()
            for row, token in enumerate(generator.get_next_tokens()):
                if not done[row]:
                    out[row].append(int(token))
                    done[row] = int(token) in self.eos_token_ids or len(out[row]) >= sampling.max_new_tokens
        return out
