"""What a GGUF file says about itself: architecture, file type, each tensor's type; and whether it is whole.

Read with the `gguf` package (llama.cpp's own reader, on PyPI), imported here only. A file that is
not GGUF, is cut short, or whose tensors point past its end raises GgufInvalid with one message.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import EngineError


class GgufInvalid(EngineError, ValueError):
    """Not a readable, complete GGUF file."""


def _value(field: Any) -> Any:
    try:
        return field.contents()
    except AttributeError:  # older gguf: the last part holds the value
        return field.parts[field.data[0]].tolist()[0] if field.data else None


def read_info(path: Path, tensors: bool = True) -> dict[str, Any]:
    """{architecture, ftype, file_type_id, context_length, name, tensor_types, tensors, ...}."""
    path = Path(path)
    hint = "the file may be truncated or corrupt: download it again, or check it with `sha256sum`"
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise GgufInvalid(f"cannot read {path}: {error.strerror}") from None
    if magic != b"GGUF":
        raise GgufInvalid(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')",
                          hint="give a .gguf file made by llama.cpp or a tool that writes GGUF")
    try:
        from gguf import GGUFReader, LlamaFileType

        reader = GGUFReader(str(path), "r")
    except ImportError:
        raise EngineError("reading GGUF files needs the `gguf` package", hint="pip install 'engine[llamacpp]'") from None
    except Exception as error:  # the reader raises ValueError/struct errors/IndexError on a damaged file
        raise GgufInvalid(f"{path} is not a complete GGUF file ({type(error).__name__}: {str(error)[:160]})",
                          hint=hint) from None
    size = path.stat().st_size
    fields = {name: _value(field) for name, field in reader.fields.items() if not name.startswith("tokenizer.ggml.")}
    arch = fields.get("general.architecture")
    ftype_id = fields.get("general.file_type")
    try:
        ftype = LlamaFileType(int(ftype_id)).name.replace("MOSTLY_", "").replace("ALL_", "") if ftype_id is not None else None
    except ValueError:
        ftype = f"type {ftype_id}"
    info: dict[str, Any] = {
        "architecture": arch, "ftype": ftype, "file_type_id": ftype_id, "name": fields.get("general.name"),
        "context_length": fields.get(f"{arch}.context_length"), "block_count": fields.get(f"{arch}.block_count"),
        "quantization_version": fields.get("general.quantization_version"),
        "has_chat_template": "tokenizer.chat_template" in fields,
        "vocab_size": len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None,
    }
    end = max((t.data_offset + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise GgufInvalid(f"{path} is cut short: its tensors need {end} bytes, the file has {size}", hint=hint)
    if tensors:
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        info["tensors"] = types
        info["tensor_types"] = dict(Counter(types.values()))
        info["n_tensors"] = len(types)
        info["n_params"] = int(sum(int(t.n_elements) for t in reader.tensors))
    if ftype is None and tensors:  # files without general.file_type: name the most common weight type
        info["ftype"] = Counter(v for k, v in info["tensors"].items() if k.endswith(".weight")).most_common(1)[0][0]
    return info
