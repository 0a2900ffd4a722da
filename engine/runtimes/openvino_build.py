"""Child process of runtime `openvino`: export a Hugging Face causal LM to OpenVINO IR and compress
its weights with NNCF, through optimum-intel's public API only.

    python -m engine.runtimes.openvino_build JOB.json

JOB.json (written by engine.runtimes.openvino through engine.subproc.run_job) holds the source
folder, the output folder, the build parameters (the exact OVWeightQuantizationConfig arguments) and
the calibration texts if any; engine.subproc.child_main writes the facts worth recording to
result.json beside it. Everything runs offline; the parent sends our output to the step's build log
and kills us if it dies, so nothing here needs to clean up after a crash.
"""
from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..progress import task
from ..subproc import child_main

_LOW_BIT = {"u4", "i4", "nf4", "f4e2m1", "f8e8m0", "u8", "i8"}


def say(message: str) -> None:
    print(f"[engine] {message}", flush=True)


def truncate(tokenizer: Any, texts: list[str], seq_len: int) -> list[str]:
    """Each text cut to `seq_len` tokens (optimum-intel tokenizes a list of strings untruncated)."""
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(text if len(ids) <= seq_len else tokenizer.decode(ids[:seq_len]))
    return out


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of constant data per element type in the IR (u4/u8/nf4... are compressed weights)."""
    sizes: Counter[str] = Counter()
    for op in model.get_ops():
        if op.get_type_name() != "Constant":
            continue
        element = op.get_element_type()
        if element.is_real() or element.to_string() in _LOW_BIT:
            sizes[element.to_string()] += op.get_byte_size()
    return dict(sorted(sizes.items()))


#: optimum export task (build params "task") -> the optimum-intel class that exports and loads it
MODEL_CLASSES = {"text-generation-with-past": "OVModelForCausalLM",
                 "feature-extraction": "OVModelForFeatureExtraction",
                 "text2text-generation-with-past": "OVModelForSeq2SeqLM"}


def ir_files(folder: Path) -> list[Path]:
    """The model's IR files (one for a causal LM or an encoder; encoder + decoder for seq2seq)."""
    return sorted(p for p in folder.glob("openvino_*model.xml") if "tokenizer" not in p.name)


def copy_pooling(source: Path, out: Path) -> None:
    """sentence-transformers' pooling config travels with an embedding model (model.embed reads it)."""
    import shutil

    if (source / "modules.json").is_file():
        shutil.copy2(source / "modules.json", out / "modules.json")
        for folder in source.glob("1_Pooling"):
            shutil.copytree(folder, out / folder.name, dirs_exist_ok=True)


def run(job: dict) -> dict[str, Any]:
    """Export and compress; the facts worth recording."""
    params, source, out = job["params"], Path(job["source"]), Path(job["out"])
    stages = task("openvino build", 3, "stages")  # reported to the engine's terminal (engine.progress)
    stages.step("importing openvino, optimum-intel, nncf")
    say("importing openvino, optimum-intel, nncf, transformers")
    import openvino as ov
    import optimum.intel
    from optimum.intel import OVWeightQuantizationConfig
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    kwargs: dict[str, Any] = {"export": True, "compile": False}
    facts: dict[str, Any] = {"precision": params["precision"]}
    if params["precision"] in ("fp16", "fp32"):
        kwargs["load_in_8bit"] = False  # optimum-intel would otherwise compress models > 1B to int8
    else:
        config = dict(params["config"])
        if job.get("texts") is not None:
            texts = truncate(tokenizer, job["texts"], params["calibration"]["seq_len"])
            config.update(dataset=texts, num_samples=len(texts), tokenizer=str(source))
            facts["calibration_samples"] = len(texts)
        kwargs["quantization_config"] = OVWeightQuantizationConfig(**config)
    stages.step(f"exporting and compressing ({params['precision']})")
    say(f"exporting {source.name} to OpenVINO IR ({params['precision']})")
    model_class = getattr(optimum.intel, MODEL_CLASSES[params["task"]])
    model = model_class.from_pretrained(str(source), **kwargs)
    stages.step("saving")
    model.save_pretrained(out)
    if params["precision"] == "fp16" and params["task"] != "text2text-generation-with-past":
        ov.save_model(model.model, out / "openvino_model.xml", compress_to_fp16=True)
    tokenizer.save_pretrained(out)
    copy_pooling(source, out)
    if params.get("openvino_tokenizer"):
        say("converting the tokenizer (openvino-tokenizers)")
        from openvino_tokenizers import convert_tokenizer

        ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True)
        ov.save_model(ov_tokenizer, out / "openvino_tokenizer.xml")
        ov.save_model(ov_detokenizer, out / "openvino_detokenizer.xml")
    sizes: Counter[str] = Counter()
    for xml in ir_files(out):
        sizes.update(weight_bytes(ov.Core().read_model(xml)))
    facts["weight_bytes"] = dict(sorted(sizes.items()))
    stages.finish()
    say("done")
    return facts


def main(argv: list[str]) -> int:
    return child_main(run, argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
