"""Turn a recipe's ``source`` into a local model folder and an identity.

The identity (hub commit, folder digest, or synthetic spec + library versions) names the exact
input bytes, so it is what cache keys are built on. ``source_identity`` computes it cheaply (no
download, no model build) so a cached apply can be answered without touching the network.
huggingface_hub and torch are imported only inside the functions that need them.
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.errors import SourceUnavailable
from engine.hashing import StatCache, tree_digest, tree_manifest

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Library versions whose changes can change the synthetic model's bytes.
SYNTHETIC_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class ResolvedSource:
    """A source pinned to exact bytes: ``identity`` feeds cache keys, ``description`` the registry."""

    kind: str  # "hub" | "path" | "synthetic"
    identity: dict[str, Any]
    description: dict[str, Any] = field(default_factory=dict)


def source_kind(source: dict[str, Any]) -> str:
    """Which of the three source forms this is (the schema guarantees exactly one)."""
    kinds = [k for k in ("model", "path", "synthetic") if k in source]
    if len(kinds) != 1:
        raise SourceUnavailable(
            "source needs exactly one of `model` (with `revision`), `path` or `synthetic`",
            hint="for example `source: {model: org/name, revision: <commit sha>}` or `source: {path: ./my-model}`",
        )
    return {"model": "hub", "path": "path", "synthetic": "synthetic"}[kinds[0]]


# -- helpers ---------------------------------------------------------------------------------
def hub_offline() -> bool:
    """huggingface_hub's own offline switch, re-reading the env (its constant is fixed at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    return bool(constants.HF_HUB_OFFLINE) or env in _TRUE


def _hub_cache(cache_dir: Path | None) -> Path:
    """The hub cache folder, reading the env now (huggingface_hub fixed its default at import)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _download_hint(repo: str, revision: str) -> str:
    return (
        f"on a connected machine run `hf download {repo} --revision {revision}`, copy its hub cache "
        "(HF_HUB_CACHE, by default ~/.cache/huggingface/hub) here and point HF_HOME or HF_HUB_CACHE "
        "at it; or download the folder and use `source.path` instead"
    )


def _short_reason(error: BaseException, offline: bool) -> str:
    from huggingface_hub import errors as hub_errors

    if isinstance(error, hub_errors.RevisionNotFoundError):
        return "revision not found on the hub"
    if isinstance(error, hub_errors.GatedRepoError):
        return "gated repository: accept its licence on the hub and log in (`hf auth login`)"
    if isinstance(error, hub_errors.RepositoryNotFoundError):
        return "repository not found, or private (log in with `hf auth login`)"
    if isinstance(error, hub_errors.LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
        return f"not in the local hub cache and {why}"
    first = (str(error).strip().splitlines() or [""])[0]
    try:
        import httpx

        if isinstance(error, httpx.TransportError):
            return f"the hub is unreachable ({type(error).__name__}: {first[:160]})"
    except ImportError:  # huggingface_hub < 1.0 uses requests
        pass
    return f"{type(error).__name__}: {first[:200]}" if first else type(error).__name__


def _folder_facts(folder: Path) -> dict[str, Any]:
    files = [p for p in folder.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(folder).parts)]
    return {"files": len(files), "total_size": sum(p.stat().st_size for p in files)}


def _require_config(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise SourceUnavailable(
            f"{what} has no config.json: {folder}",
            hint="a model folder needs config.json, the weights (*.safetensors) and the tokenizer "
            "files, as written by `save_pretrained` or `hf download`",
        )


def _path_folder(source: dict[str, Any], base_dir: Path) -> Path:
    folder = (Path(base_dir) / Path(source["path"]).expanduser()).resolve()
    if not folder.is_dir():
        raise SourceUnavailable(
            f"source.path does not exist or is not a folder: {folder}",
            hint="relative paths are relative to the recipe file",
        )
    _require_config(folder, "source.path")
    return folder


def _synthetic_identity(source: dict[str, Any]) -> dict[str, Any]:
    from engine.runtimes import installed_version
    from engine.synthetic import GENERATOR_VERSION, with_defaults

    try:
        spec = with_defaults(source["synthetic"])
    except ValueError as exc:
        raise SourceUnavailable(f"source.synthetic: {exc}") from exc
    versions: dict[str, str] = {}
    for name in SYNTHETIC_LIBRARIES:
        try:
            versions[name] = installed_version(name)
        except metadata.PackageNotFoundError:
            raise SourceUnavailable(
                f"a synthetic source needs {name}, which is not installed",
                hint="pip install 'engine[torch]'",
            ) from None
    return {"synthetic": spec, "versions": versions, "generator": GENERATOR_VERSION}


def resolve_hub_revision(repo: str, revision: str, cache_dir: Path | None = None) -> str:
    """A branch/tag -> its commit: the local cache's refs first, then the hub unless offline."""
    if COMMIT_RE.match(revision):
        return revision
    ref = _hub_cache(cache_dir) / f"models--{repo.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8").strip()
        if COMMIT_RE.match(commit):
            return commit
    offline = hub_offline()
    if not offline:
        from huggingface_hub import HfApi

        try:
            sha = HfApi().model_info(repo, revision=revision).sha
        except Exception as exc:  # any hub/network failure means: not available
            raise SourceUnavailable(
                f"cannot resolve {repo}@{revision}: {_short_reason(exc, offline)}",
                hint=_download_hint(repo, revision),
            ) from exc
        if sha and COMMIT_RE.match(sha):
            return sha
    raise SourceUnavailable(
        f"cannot resolve {repo}@{revision} to a commit: no ref `{revision}` in the hub cache "
        f"{_hub_cache(cache_dir)}" + (" and HF_HUB_OFFLINE is set" if offline else ""),
        hint="pin `revision` to a full 40-character commit sha; " + _download_hint(repo, revision),
    )


# -- public API ------------------------------------------------------------------------------
def source_identity(
    source: dict[str, Any],
    base_dir: Path,
    stat_cache: StatCache | None,
    *,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The identity of the source's bytes, without downloading or building anything.

    A hub source pinned to a 40-hex commit costs nothing (no network, no hub import).
    """
    kind = source_kind(source)
    if kind == "hub":
        repo, revision = source["model"], str(source.get("revision") or "main")
        return {"repo": repo, "commit": resolve_hub_revision(repo, revision, cache_dir)}
    if kind == "path":
        folder = _path_folder(source, base_dir)
        return {"tree_digest": tree_digest(tree_manifest(folder, stat_cache))}
    return _synthetic_identity(source)


def materialize_source(
    source: dict[str, Any],
    base_dir: Path,
    dest_parent: Path,
    *,
    allow_patterns: list[str] | None = None,
    cache_dir: Path | None = None,
    stat_cache: StatCache | None = None,
) -> tuple[Path, ResolvedSource]:
    """A local folder holding the model, and what exactly it is.

    hub: the snapshot folder in the hub cache (downloaded unless offline); when ``allow_patterns``
    leaves out cached files, a folder of symlinks to just the allowed files is made under
    ``dest_parent``. path: the folder itself. synthetic: built in a new folder under ``dest_parent``.
    """
    kind = source_kind(source)
    if kind == "hub":
        return _materialize_hub(source, Path(dest_parent), allow_patterns, cache_dir)
    if kind == "path":
        folder = _path_folder(source, base_dir)
        manifest = tree_manifest(folder, stat_cache)
        facts = {"files": len(manifest), "total_size": sum(e["size"] for e in manifest)}
        resolved = ResolvedSource(
            "path", {"tree_digest": tree_digest(manifest)}, {"path": str(folder), **facts}
        )
        return folder, resolved
    identity = _synthetic_identity(source)
    from engine.synthetic import make_synthetic_model

    Path(dest_parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="synthetic-", dir=dest_parent))
    make_synthetic_model(identity["synthetic"], folder)
    return folder, ResolvedSource("synthetic", identity, {"path": str(folder), **_folder_facts(folder)})


def _materialize_hub(
    source: dict[str, Any], dest_parent: Path, allow_patterns: list[str] | None, cache_dir: Path | None
) -> tuple[Path, ResolvedSource]:
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repo, revision = source["model"], str(source.get("revision") or "main")
    offline = hub_offline()
    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(
                repo,
                revision=revision,
                allow_patterns=allow_patterns,
                cache_dir=_hub_cache(cache_dir),
                local_files_only=offline,
            )
        )
    except Exception as exc:  # any hub/network failure means: not available
        raise SourceUnavailable(
            f"cannot download {repo}@{revision}: {_short_reason(exc, offline)} "
            f"(hub cache: {_hub_cache(cache_dir)})",
            hint=_download_hint(repo, revision),
        ) from exc
    commit = snapshot.name
    if not COMMIT_RE.match(commit):
        raise SourceUnavailable(f"unexpected hub snapshot folder for {repo}@{revision}: {snapshot}")

    folder = snapshot
    if allow_patterns is not None:
        present = sorted(
            p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
        )
        kept = list(filter_repo_objects(present, allow_patterns=allow_patterns))
        if not kept:
            raise SourceUnavailable(
                f"{repo}@{revision}: no cached file matches {allow_patterns} in {snapshot}",
                hint=_download_hint(repo, revision),
            )
        if len(kept) != len(present):  # hide files the caller did not ask for
            dest_parent.mkdir(parents=True, exist_ok=True)
            folder = Path(tempfile.mkdtemp(prefix="hub-", dir=dest_parent))
            for rel in kept:
                link = folder / rel
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(os.path.realpath(snapshot / rel))
    _require_config(folder, f"hub snapshot {repo}@{commit}")
    description = {
        "repo": repo,
        "revision": revision,
        "commit": commit,
        "snapshot": str(snapshot),
        "path": str(folder),
        **_folder_facts(folder),
    }
    return folder, ResolvedSource("hub", {"repo": repo, "commit": commit}, description)
