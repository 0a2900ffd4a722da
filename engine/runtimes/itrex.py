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
import queue
import sys
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from ..calibration import calibration_key, load_texts
from ..errors import BuildFailed, EngineError
from ..subproc import run_logged
from .base import Model, Progress, Runtime, Sampling

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
        settings["use_layer_wise"] = False  # RTN defaults to layer-wise mode, which needs a checkpoint path
    if algorithm == "awq":  # as ITREX: scale search, AWQ's own clip search, scales folded into the previous layer
        settings.update(use_auto_scale=True, use_auto_clip=True, folding=True)
    if algorithm == "teq":
        settings["folding"] = True
    settings["quant_lm_head"] = False  # ITREX kept lm_head in full precision
    return settings


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
    step_version = 1
    distributions = ("neural-compressor-pt", "torch", "transformers", "safetensors")

    def build_params(self, recipe: dict, base_dir: Path) -> dict:
        quant, options = recipe["quantization"], recipe["target"].get("options", {})
        algorithm = quant["algorithm"]
        params: dict[str, Any] = {
            "precision": "int4_clip" if quant["weight_dtype"] == "int4" else quant["weight_dtype"],
            "algorithm": algorithm,
            "inc_class": INC_CLASS[algorithm],
            "inc": inc_settings(quant),
            "fp32_modules": sorted(quant["skip_modules"]),
            "_itrex": {key: quant[key] for key in ITREX_KEYS if key in quant},
        }
        if algorithm != "rtn":  # the schema requires calibration for awq/teq/gptq and refuses it for rtn
            params["calibration"] = calibration_key(quant["calibration"], base_dir)
            params["_calibration"] = quant["calibration"]
            params["_base_dir"] = str(base_dir)
        if algorithm == "teq":
            params["teq"] = {key: options.get(f"teq_{key}", value) for key, value in TEQ_DEFAULTS.items()}
        return params

    def build(self, source_dir: Path, out_dir: Path, params: dict, logs_dir: Path,
              progress: Progress) -> dict:
        job = {
            "source_dir": str(source_dir), "out_dir": str(out_dir), "algorithm": params["algorithm"],
            "inc": params["inc"], "skip_modules": params["fp32_modules"], "itrex": params["_itrex"],
            "seed": params.get("teq", {}).get("seed", 0), "teq": params.get("teq"),
        }
        if "_calibration" in params:
            job["calibration_texts"] = load_texts(params["_calibration"], Path(params["_base_dir"]))
            job["seq_len"] = params["calibration"]["seq_len"]
        job_path = logs_dir / "job.json"
        job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
        cmd = [sys.executable, "-m", "engine.runtimes.itrex_build", str(job_path)]
        try:
            run_logged(cmd, logs_dir / "build.log", env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
                       on_line=progress, what="itrex quantization (neural-compressor)")
        except BuildFailed:
            _raise_user_error(logs_dir / "result.json")
            raise
        result = json.loads((logs_dir / "result.json").read_text(encoding="utf-8"))
        return {
            "implementation": "neural-compressor-pt", "api": "neural_compressor.torch.quantization",
            "implementation_version": metadata.version("neural-compressor-pt"),
            "mapping": mapping_rows(params["_itrex"]), "note": NOTE,
            "source_weights_bytes": _weights_bytes(source_dir),
            "weights_bytes": (out_dir / "quantized_weight.pt").stat().st_size,
            **{k: v for k, v in result.items() if k not in ("format", "itrex")},
            "itrex": params["_itrex"],
        }

    def load(self, artifact_dir: Path, info: dict, **options: Any) -> Model:
        """Options: num_threads (torch intra-op threads)."""
        unknown = set(options) - {"num_threads"}
        if unknown:
            raise EngineError(f"unknown load option(s) for runtime 'itrex': {', '.join(sorted(unknown))}",
                              hint="runtime 'itrex' takes num_threads=N")
        if "num_threads" in options:
            import torch

            threads = options["num_threads"]
            if not isinstance(threads, int) or threads < 1:
                raise EngineError(f"num_threads must be a positive integer, got {threads!r}")
            torch.set_num_threads(threads)
        from transformers import AutoTokenizer

        from .itrex_build import load_quantized

        # INC print()s progress to stdout and logs at INFO: stdout is the user's (`engine run`)
        logging.getLogger("neural_compressor").setLevel(logging.WARNING)
        with contextlib.redirect_stdout(sys.stderr):
            model = load_quantized(artifact_dir)
        return ItrexModel(info, model, AutoTokenizer.from_pretrained(artifact_dir))


def _raise_user_error(result_path: Path) -> None:
    """The child reports mistakes only the model reveals (a skip_modules entry matching nothing)."""
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if result.get("error"):  # the hint goes into the message: the pipeline's hint names the log
        hint = result.get("hint")
        raise BuildFailed(result["error"] + (f" ({hint})" if hint else ""))


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))


class ItrexModel(Model):
    """A quantized transformers model on CPU; `native` is the torch module (INCWeightOnlyLinear layers)."""

    def __init__(self, info: dict, model: Any, tokenizer: Any) -> None:
        super().__init__(info, model)
        self.tokenizer = tokenizer
        config = model.generation_config
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        pad = config.pad_token_id if config.pad_token_id is not None else tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else min(self.eos_token_ids, default=0)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def logits(self, ids: list[int]) -> Any:
        import numpy as np
        import torch

        input_ids = torch.tensor([ids])
        with torch.no_grad():
            out = self.native(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
        return np.asarray(out.logits[0].float(), dtype=np.float32)

    def _options(self, s: Sampling) -> dict[str, Any]:
        options: dict[str, Any] = {"max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample,
                                   "pad_token_id": self.pad_token_id, "eos_token_id": sorted(self.eos_token_ids)}
        if s.do_sample:
            options.update({k: v for k, v in (("temperature", s.temperature), ("top_p", s.top_p),
                                              ("top_k", s.top_k)) if v is not None})
        else:  # greedy whatever the checkpoint's generation_config says
            options.update(temperature=None, top_p=None, top_k=None)
        if s.repetition_penalty is not None:
            options["repetition_penalty"] = s.repetition_penalty
        return options

    def _until_eos(self, ids: list[int]) -> list[int]:
        for i, token in enumerate(ids):
            if token in self.eos_token_ids:
                return ids[: i + 1]
        return ids

    def generate_ids(self, batch: list[list[int]], sampling: Sampling) -> list[list[int]]:
        """All prompts in one batch: left padding and an attention mask."""
        import torch

        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(ids)) + ids for ids in batch])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch])
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        with torch.no_grad():
            out = self.native.generate(input_ids=input_ids, attention_mask=mask, **self._options(sampling))
        return [self._until_eos(row) for row in out[:, width:].tolist()]

    def stream_ids(self, ids: list[int], sampling: Sampling) -> Iterator[int]:
        """transformers' generate in a thread, its streamer feeding a queue: same tokens as generate_ids."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tokens: queue.Queue = queue.Queue()
        cancel = threading.Event()

        class Streamer:
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:  # generate first puts the prompt itself
                    self.prompt_seen = True
                    return
                for token in value.reshape(-1).tolist():
                    tokens.put(int(token))

            def end(self) -> None:
                tokens.put(None)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        failure: list[BaseException] = []

        def work() -> None:
            try:
                if sampling.seed is not None:
                    torch.manual_seed(sampling.seed)
                with torch.no_grad():
                    self.native.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                         dtype=torch.long), streamer=Streamer(),
                                         stopping_criteria=StoppingCriteriaList([Cancelled()]),
                                         **self._options(sampling))
            except BaseException as error:  # handed to the consumer below
                failure.append(error)
                tokens.put(None)

        thread = threading.Thread(target=work, name="itrex-generate", daemon=True)
        thread.start()
        try:
            while (token := tokens.get()) is not None:
                yield token
                if token in self.eos_token_ids:
                    return
        finally:
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]
