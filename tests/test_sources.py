"""Sources: a hand-made hub cache (offline), local folders and the synthetic model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubcache import write_snapshot

from engine.errors import SourceUnavailable
from engine.hashing import StatCache
from engine.sources import HubSource, Materialize, source_from_recipe


def source_identity(spec: dict, base: Path, stat_cache, cache_dir: Path | None = None) -> dict:
    source = source_from_recipe(spec, base)
    if isinstance(source, HubSource):
        source.cache_dir = cache_dir
    return source.identity(stat_cache)


def materialize(spec: dict, base: Path, scratch: Path, allow_patterns=None, cache_dir: Path | None = None,
                stat_cache=None) -> Path:
    """A source's folder; a built source (synthetic) is made in a new folder under `scratch` each time."""
    import tempfile

    def cached(work):
        scratch.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=scratch))
        work(folder)
        return folder

    return source_from_recipe(spec, base).materialize(Materialize(scratch, allow_patterns, stat_cache, cached,
                                                                   cache_dir))


REPO = "org/tiny"
COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"
UNKNOWN = "f" * 40


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache with two commits of org/tiny; refs/main -> COMMIT_B. Offline mode on."""
    cache = tmp_path / "hub"
    repo_dir = cache / "models--org--tiny"
    base = {
        "config.json": b'{"model_type": "llama"}',
        "model.safetensors": b"weights-a",
        "tokenizer.json": b"{}",
        "original/consolidated.pth": b"not wanted",
    }
    write_snapshot(repo_dir, COMMIT_A, base)
    write_snapshot(repo_dir, COMMIT_B, {**base, "model.safetensors": b"weights-b"})
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(COMMIT_B)
    (repo_dir / "refs" / "v1.0").write_text(COMMIT_A)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    return cache


@pytest.fixture()
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "recipes" / "my-model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "phi3"}')
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    return folder


# -- hub -------------------------------------------------------------------------------------
@pytest.mark.parametrize("revision, commit", [(COMMIT_A, COMMIT_A), ("main", COMMIT_B), ("v1.0", COMMIT_A)])
def test_hub_materialize_offline(hub_cache: Path, tmp_path: Path, revision: str, commit: str) -> None:
    source = {"model": REPO, "revision": revision}
    folder = materialize(source, tmp_path, tmp_path / "stage", cache_dir=hub_cache)
    assert source_from_recipe(source, tmp_path).kind == "hub"
    assert folder == hub_cache / "models--org--tiny" / "snapshots" / commit
    assert source_from_recipe(source, tmp_path).describe() == {"repo": REPO, "revision": revision}
    expected = b"weights-a" if commit == COMMIT_A else b"weights-b"
    assert (folder / "model.safetensors").read_bytes() == expected
    assert source_identity(source, tmp_path, None, cache_dir=hub_cache) == {"repo": REPO, "commit": commit}


def test_hub_cache_from_env(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    source = {"model": REPO, "revision": "main"}
    folder = materialize(source, tmp_path, tmp_path / "stage")
    assert folder.name == COMMIT_B
    assert source_identity(source, tmp_path, None) == {"repo": REPO, "commit": COMMIT_B}


def test_hub_allow_patterns(hub_cache: Path, tmp_path: Path) -> None:
    source = {"model": REPO, "revision": COMMIT_A}
    folder = materialize(source, tmp_path, tmp_path / "stage", ["*.json", "*.safetensors"], hub_cache)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert folder.parent == tmp_path / "stage"  # a filtered view, the cache is untouched
    assert (folder / "model.safetensors").read_bytes() == b"weights-a"
    assert (hub_cache / "models--org--tiny" / "snapshots" / COMMIT_A / "original" / "consolidated.pth").exists()

    # patterns that keep everything: the snapshot itself
    folder2 = materialize(source, tmp_path, tmp_path / "stage", ["*"], hub_cache)
    assert folder2 == hub_cache / "models--org--tiny" / "snapshots" / COMMIT_A

    with pytest.raises(SourceUnavailable, match="config.json"):
        materialize(source, tmp_path, tmp_path / "stage", ["*.safetensors"], hub_cache)


def test_hub_unknown_commit_is_explained(hub_cache: Path, tmp_path: Path) -> None:
    source = {"model": REPO, "revision": UNKNOWN}
    with pytest.raises(SourceUnavailable) as info:
        materialize(source, tmp_path, tmp_path / "stage", cache_dir=hub_cache)
    err = info.value
    assert f"cannot download {REPO}@{UNKNOWN}" in err.message
    assert "HF_HUB_OFFLINE" in err.message and str(hub_cache) in err.message
    assert f"hf download {REPO} --revision {UNKNOWN}" in (err.hint or "")
    assert "source.path" in (err.hint or "")
    assert isinstance(err, FileNotFoundError)
    # a pinned commit needs no lookup: the identity is known even before any download
    assert source_identity(source, tmp_path, None, cache_dir=hub_cache) == {"repo": REPO, "commit": UNKNOWN}


def test_hub_unknown_branch_offline(hub_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable, match="cannot resolve org/tiny@dev") as info:
        source_identity({"model": REPO, "revision": "dev"}, tmp_path, None, cache_dir=hub_cache)
    assert "40-character" in (info.value.hint or "")
    with pytest.raises(SourceUnavailable, match="cannot download org/tiny@dev"):
        materialize({"model": REPO, "revision": "dev"}, tmp_path, tmp_path / "s", cache_dir=hub_cache)


def test_pinned_identity_and_imports_stay_light(tmp_path: Path) -> None:
    """Importing the modules and identifying a pinned hub source or a synthetic spec loads no heavy library."""
    code = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "import engine.hashing, engine.sources\n"
        "from engine.sources import source_from_recipe\n"
        f"a = source_from_recipe({{'model': 'microsoft/Phi-3.5-mini-instruct', 'revision': '{COMMIT_B}'}}, Path('.')).identity(None)\n"
        "b = source_from_recipe({'synthetic': {'seed': 1}}, Path('.')).identity(None)\n"
        "heavy = [m for m in ('huggingface_hub', 'torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
        "print(json.dumps([a, b, heavy]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    pinned, synthetic, heavy = json.loads(out.stdout)
    assert pinned == {"repo": "microsoft/Phi-3.5-mini-instruct", "commit": COMMIT_B}
    assert synthetic["synthetic"]["seed"] == 1 and synthetic["synthetic"]["hidden_size"] == 64
    assert heavy == []


# -- path ------------------------------------------------------------------------------------
def test_path_identity_stable_and_sensitive(model_dir: Path, tmp_path: Path) -> None:
    base = model_dir.parent  # relative to the recipe file's folder
    cache = StatCache(tmp_path / "stat.sqlite")
    source = {"path": "my-model"}
    first = source_identity(source, base, cache)
    assert set(first) == {"tree_digest"} and len(first["tree_digest"]) == 64
    assert source_identity(source, base, cache) == first
    assert source_identity({"path": str(model_dir)}, tmp_path, None) == first

    folder = materialize(source, base, tmp_path / "stage", stat_cache=cache)
    assert folder == model_dir.resolve()  # used in place, no copy
    described = source_from_recipe(source, base)
    assert described.kind == "path" and described.describe() == {"path": str(model_dir.resolve())}
    assert described.config() == {"model_type": "phi3"} and described.local_folder() == model_dir.resolve()
    assert not (tmp_path / "stage").exists()

    (model_dir / "model.safetensors").write_bytes(b"\x00" * 63 + b"\x01")
    assert source_identity(source, base, cache) != first


def test_path_missing_or_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(SourceUnavailable) as info:
        source_identity({"path": "nope"}, tmp_path, None)
    assert str((tmp_path / "nope").resolve()) in info.value.message
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceUnavailable, match="config.json") as info:
        materialize({"path": "empty"}, tmp_path, tmp_path / "s")
    assert "safetensors" in (info.value.hint or "")


# -- synthetic -------------------------------------------------------------------------------
def test_synthetic_identity_has_defaults_and_versions(tmp_path: Path) -> None:
    ident = source_identity({"synthetic": {"architecture": "llama"}}, tmp_path, None)
    assert ident["synthetic"] == {
        "architecture": "llama",
        "seed": 0,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
    }
    assert {"torch", "transformers"} <= set(ident["versions"])
    assert ident != source_identity({"synthetic": {"architecture": "llama", "seed": 1}}, tmp_path, None)
    assert source_identity({"synthetic": {}}, tmp_path, None) == source_identity({"synthetic": {"seed": 0}}, tmp_path, None)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("architecture", ["phi3", "llama"])
def test_synthetic_deterministic_and_usable(tmp_path: Path, architecture: str) -> None:
    torch = pytest.importorskip("torch", reason="the synthetic source needs torch")
    transformers = pytest.importorskip("transformers", reason="the synthetic source needs transformers")
    source = {"synthetic": {"architecture": architecture, "seed": 7}}
    stage = tmp_path / "stage"
    rng_before = torch.random.get_rng_state()
    one = materialize(source, tmp_path, stage)
    two = materialize(source, tmp_path, stage)
    assert torch.equal(rng_before, torch.random.get_rng_state())  # caller's RNG untouched
    assert one != two and one.parent == stage == two.parent
    files = _files(one)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= set(files)
    assert files == _files(two)  # byte-identical, every file

    config = json.loads(files["config.json"])
    assert config["model_type"] == architecture and config["dtype"] == "float32"
    assert json.loads(files["tokenizer_config.json"])["tokenizer_class"] == "PreTrainedTokenizerFast"

    model = transformers.AutoModelForCausalLM.from_pretrained(one)
    tok = transformers.AutoTokenizer.from_pretrained(one)
    assert config["vocab_size"] >= len(tok) and config["vocab_size"] % 8 == 0
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "</s>")
    assert config["bos_token_id"] == tok.bos_token_id and config["eos_token_id"] == tok.eos_token_id
    assert config["pad_token_id"] == tok.pad_token_id
    assert tok.decode(tok("héllo, wörld!").input_ids) == "héllo, wörld!"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    inputs = tok(prompt, return_tensors="pt")
    assert inputs.input_ids[0, 0].item() == tok.convert_tokens_to_ids("<|user|>")  # specials stay whole
    out = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape[1] == inputs.input_ids.shape[1] + 5
    assert isinstance(tok.decode(out[0, inputs.input_ids.shape[1]:]), str)
    assert tok.convert_tokens_to_ids("<|end|>") in model.generation_config.eos_token_id
