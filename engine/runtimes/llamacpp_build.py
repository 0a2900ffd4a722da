"""The llama.cpp build child: `python -m engine.runtimes.llamacpp_build logs/job.json` (engine.subproc protocol).

Runs llama.cpp's converter, `llama-imatrix` and `llama-quantize` from the toolkit folder the job
names (their output goes to the build log), or copies a ready-made GGUF; then reads the result's
tensor types and loads it once with llama-cpp-python. A user's mistake that only the model reveals
(a tokenizer or architecture llama.cpp does not know, a damaged file, too little calibration text,
a skip_modules entry matching no tensor) is a JobError: one message and a hint.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from ..progress import task
from ..subproc import JobError, child_main
from .gguf_info import GgufInvalid, read_info

GGUF_FILE = "model.gguf"
FLOAT_FTYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}
#: converter / tool output -> (message, hint) for the user
KNOWN_FAILURES = (
    (r"BPE pre-tokenizer was not recognized",
     "llama.cpp's converter does not recognize this model's tokenizer (its BPE pre-tokenizer has no entry in "
     "convert_hf_to_gguf.py)",
     "llama.cpp converts SentencePiece tokenizers (tokenizer.model) and the BPE pre-tokenizers it lists; convert "
     "the model with a llama.cpp that knows it and register the .gguf as a source (`source: {path: model.gguf}`)"),
    (r"(?:Model|Architecture) ([\w.-]+) is not supported",
     "llama.cpp's converter does not support the architecture {0}",
     "see the architectures convert_hf_to_gguf.py lists (`--print-supported-models`), or register a ready-made .gguf"),
    (r"Missing (\S*tokenizer\.model)",
     "llama.cpp's converter does not recognize this model's tokenizer: for this architecture it reads a "
     "SentencePiece tokenizer.model, and the checkpoint has none ({0})",
     "llama.cpp converts this family only with its SentencePiece tokenizer.model; convert the model with a tool "
     "that knows its tokenizer and register the .gguf as a source (`source: {path: model.gguf}`)"),
    (r"unknown model architecture: '([^']+)'",
     "llama.cpp does not know the architecture '{0}'",
     "a newer llama-cpp-python may; or use another runtime"),
    (r"you need at least (\d+) tokens for a context of (\d+) tokens",
     "the calibration text is too short for the importance matrix: llama-imatrix needs at least {0} tokens for "
     "a context of {1}",
     "add text to quantization.calibration.dataset or lower quantization.calibration.seq_len"),
)


#: llama-quantize's "[  25/ 195] blk.3.ffn_down.weight ..." lines: tensors done / total
_QUANTIZED = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a tool with its output echoed to ours (the build log); JobError naming a known failure.
    llama-quantize's tensor counter becomes an engine.progress task."""
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
    assert proc.stdout is not None
    lines = []
    counted = None
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace")
        lines.append(line)
        sys.stdout.write(line)
        sys.stdout.flush()
        found = _QUANTIZED.match(line)
        if found:
            counted = counted or task(f"{what}: tensors", int(found.group(2)), "tensors")
            counted.update(int(found.group(1)))
    if counted is not None:
        counted.finish()
    code = proc.wait()
    output = "".join(lines)
    if code != 0:
        for pattern, message, hint in KNOWN_FAILURES:
            found = re.search(pattern, output)
            if found:
                raise JobError(message.format(*found.groups()), hint)
        last = next((line.strip() for line in reversed(lines) if line.strip()), "")
        raise JobError(f"{what} failed (exit {code}): {last[:300]}")
    return output


def _probe(path: Path) -> dict[str, Any]:
    """Load the file once with llama-cpp-python (as engine.load will) and score one token."""
    code = textwrap.dedent(f"""
        import json, sys
        from llama_cpp import Llama
        llm = Llama(model_path={str(path)!r}, n_ctx=64, verbose=True)
        ids = llm.tokenize(b"Hello", add_bos=True)
        llm.eval(ids)
        print("PROBE " + json.dumps({{"n_vocab": llm.n_vocab(), "prompt_ids": len(ids)}}))
    """)
    output = _run([sys.executable, "-c", code], "loading the GGUF with llama-cpp-python")
    import json

    line = next(line for line in output.splitlines() if line.startswith("PROBE "))
    return json.loads(line[6:])


def _read(path: Path) -> dict[str, Any]:
    try:
        return read_info(path)
    except GgufInvalid as error:
        raise JobError(error.message, error.hint) from None


def _import(job: dict, out_dir: Path) -> dict[str, Any]:
    files = sorted(Path(job["source_dir"]).glob("*.gguf"))
    if len(files) != 1:
        raise JobError(f"expected one .gguf file in the source, found {len(files)}")
    src = files[0]
    print(f"importing {src}", flush=True)
    info = _read(src)
    stated = job.get("stated", {}).get("ftype")
    if stated and stated != info["ftype"]:
        raise JobError(f"target.options.ftype: '{stated}' contradicts the file, which is {info['ftype']}",
                       hint=f"write ftype: {info['ftype']}, or leave it out (it is read from the file)")
    shutil.copyfile(src, out_dir / GGUF_FILE)
    probe = _probe(out_dir / GGUF_FILE)
    return {"imported": True, "original_file": src.name, **_facts(info), "probe": probe}


def _facts(info: dict) -> dict[str, Any]:
    return {"ftype": info["ftype"], "built_weight_type": info["ftype"], "architecture": info["architecture"], "tensor_types": info["tensor_types"],
            "n_tensors": info["n_tensors"], "n_params": info["n_params"], "vocab_size": info["vocab_size"],
            "context_length": info["context_length"], "has_chat_template": info["has_chat_template"],
            "gguf_metadata": {"name": info["name"], "file_type_id": info["file_type_id"],
                              "quantization_version": info["quantization_version"]}}


def _imatrix(kit: Path, model: Path, texts: list[str], seq_len: int, scratch: Path) -> str:
    """scratch/imatrix.gguf from the texts. Files are named relative to scratch: llama.cpp records the
    names in the matrix and the quantized file, and the staging folder's path must not enter them."""
    (scratch / "calibration.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    _run([str(kit / "bin" / "llama-imatrix"), "-m", model.name, "-f", "calibration.txt", "-o", "imatrix.gguf",
          "-c", str(seq_len), "-b", str(seq_len), "--chunks", "-1", "-t", str(os.cpu_count() or 1), "--no-ppl"],
         "llama-imatrix", cwd=scratch)
    if not (scratch / "imatrix.gguf").is_file():
        raise JobError("llama-imatrix wrote no importance matrix")
    return f"llama-imatrix on {len(texts)} texts, context {seq_len}"


def _quantize_args(keep: dict) -> list[str]:
    args = []
    for module, spec in sorted(keep.items()):
        if spec["pattern"] == r"^output\.":
            args += ["--output-tensor-type", spec["type"].lower()]
        elif spec["pattern"] == r"^token_embd\.":
            args += ["--token-embedding-type", spec["type"].lower()]
        else:
            args += ["--tensor-type", f"{spec['pattern']}={spec['type'].lower()}"]
    return args


def _check_kept(keep: dict, tensors: dict[str, str]) -> list[list[Any]]:
    rows, missing = [], []
    for module, spec in sorted(keep.items()):
        hit = sorted(name for name in tensors if re.search(spec["pattern"], name))
        if not hit:
            missing.append(module)
            continue
        wrong = [name for name in hit if name.endswith(".weight") and tensors[name] != spec["type"]]
        if wrong:
            raise JobError(f"quantization.skip_modules: {module} was not kept at {spec['type']} "
                           f"({', '.join(f'{n}: {tensors[n]}' for n in wrong[:4])})")
        rows.append([module, ", ".join(hit[:6]) + (" ..." if len(hit) > 6 else ""), spec["type"]])
    if missing:
        examples = sorted({re.sub(r"^blk\.\d+\.", "blk.N.", n) for n in tensors})
        raise JobError("quantization.skip_modules matched no tensor for: " + ", ".join(missing),
                       hint="use PyTorch names such as lm_head, model.embed_tokens, model.layers.0.mlp.down_proj; "
                            "this file's tensors: " + ", ".join(examples[:14]))
    return rows


def run(job: dict) -> dict[str, Any]:
    out_dir, scratch, kit = Path(job["out_dir"]), Path(job["scratch"]), Path(job["toolkit"])
    params = job["params"]
    out_dir.mkdir(parents=True, exist_ok=True)
    scratch.mkdir(parents=True, exist_ok=True)
    if params.get("import"):
        return _import(job, out_dir)
    ftype, target = params["ftype"], out_dir / GGUF_FILE
    stages = task("llama.cpp build", 2 if ftype in FLOAT_FTYPES else 3 + bool(params.get("imatrix")), "stages")
    stages.step("converting")  # reported to the engine's terminal (engine.progress)
    convert = [sys.executable, str(kit / "convert_hf_to_gguf.py"), job["source_dir"], "--outfile"]
    args: dict[str, Any] = {}
    if ftype in FLOAT_FTYPES:
        args["convert"] = convert + [str(target), "--outtype", FLOAT_FTYPES[ftype]]
        _run(args["convert"], "llama.cpp's converter")
        imatrix_summary = None
    else:
        middle = scratch / f"model-{params['intermediate']}.gguf"
        args["convert"] = convert + [str(middle), "--outtype", params["intermediate"]]
        _run(args["convert"], "llama.cpp's converter")
        quantize = [str(kit / "bin" / "llama-quantize")]
        imatrix_summary = None
        if params.get("imatrix"):
            stages.step("importance matrix")
            imatrix_summary = _imatrix(kit, middle, job["calibration_texts"], params["imatrix"]["seq_len"], scratch)
            quantize += ["--imatrix", "imatrix.gguf"]
        quantize += _quantize_args(params.get("keep", {}))
        args["quantize"] = quantize + [middle.name, str(target), ftype, str(os.cpu_count() or 1)]
        stages.step(f"quantizing ({ftype})")
        _run(args["quantize"], "llama-quantize", cwd=scratch)
        if params.get("imatrix"):  # kept beside the model: what the quantizer was given
            shutil.copyfile(scratch / "imatrix.gguf", out_dir / "imatrix.gguf")
        middle.unlink()
    info = _read(target)
    kept = _check_kept(params.get("keep", {}), info["tensors"]) if params.get("keep") else []
    stages.step("probing the model")
    probe = _probe(target)
    stages.finish()
    shutil.rmtree(scratch, ignore_errors=True)
    return {"imported": False, **_facts(info), "intermediate": params.get("intermediate"), "kept": kept,
            "imatrix_summary": imatrix_summary or "none", "probe": probe,
            "tool_args": {k: [Path(a).name if a.startswith("/") else a for a in v] for k, v in args.items()}}


if __name__ == "__main__":
    sys.exit(child_main(run, sys.argv[1:]))
