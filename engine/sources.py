"""Sources: where a recipe's unquantized weights come from, as small types.

Each kind of `source:` (a hub repository pinned to a commit, a local folder, a synthetic seeded
model; more kinds register in SOURCE_TYPES) knows how to identify its exact bytes cheaply (the
identity feeds cache keys: no download, no model build), describe itself for the registry, read its
config.json when that is free, and materialize a local folder for a build. `source_from_recipe` is
the only place that picks the kind. huggingface_hub and torch are imported only inside the methods
that need them.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar

from engine.errors import SourceUnavailable
from engine.hashing import StatCache, sha256_file, tree_digest, tree_manifest
from engine.versions import VersionLookup, installed_version

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# Library versions whose changes can change the synthetic model's bytes.
SYNTHETIC_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors")
_TRUE = {"1", "on", "yes", "true"}


@dataclass
class Materialize:
    """What a source needs to produce a local folder: where temporary links go, which hub files a
    runtime needs, and `cached(work)`, which runs `work(folder)` once per source key as a store step."""

    scratch: Path
    allow_patterns: list[str] | None
    stat_cache: StatCache | None
    cached: Callable[[Callable[[Path], dict]], Path]
    cache_dir: Path | None = None


class Source(ABC):
    """One `source:` form of a recipe."""

    #: the recipe key that selects this kind (`model`, `path`, `synthetic`)
    field: ClassVar[str]
    #: the kind recorded in the registry (`hub`, `path`, `synthetic`, `gguf`)
    kind: ClassVar[str]
    #: what materialize() gives: "hf" (a Hugging Face folder) or "gguf" (a folder with one .gguf file);
    #: a runtime lists the formats it builds from in Runtime.source_formats
    format: ClassVar[str] = "hf"

    @classmethod
    def accepts(cls, spec: dict[str, Any]) -> bool:
        """Whether a recipe's `source:` mapping is this kind (by default: it has the kind's key)."""
        return cls.field in spec

    def __init__(self, spec: dict[str, Any], base_dir: Path) -> None:
        self.spec = spec
        self.base_dir = Path(base_dir)

    @abstractmethod
    def identity(self, stat_cache: StatCache | None, versions: VersionLookup = installed_version) -> dict:
        """What names the exact input bytes (it enters the source key); cheap, never downloads."""

    @abstractmethod
    def describe(self) -> dict:
        """Where the source is, as recorded in the registry (not part of any key)."""

    @abstractmethod
    def detail(self, identity: dict) -> str:
        """One line for plans and progress."""

    @abstractmethod
    def materialize(self, ctx: Materialize) -> Path:
        """A local folder holding the model in Hugging Face layout."""

    def status(self, cached: bool) -> str:
        """The plan's word for this step: `hub`, `local`, or `cached` / `missing` for built ones."""
        return "cached" if cached else "missing"

    def config(self) -> dict | None:
        """The model's config.json when it can be read without downloading or building anything."""
        return None

    def local_folder(self) -> Path | None:
        """The folder the weights already lie in, when there is one before materializing."""
        return None

    def local_file(self) -> Path | None:
        """For a single-file source (a .gguf): the file, when it is already on this machine."""
        return None

    def store_key(self, identity: dict) -> str | None:
        """The store key of this source's step when it is an existing entry (a registered variant's
        artifact); None: the key is made from the identity (engine.plan.source_key)."""
        return None


# -- helpers ---------------------------------------------------------------------------------
def hub_offline() -> bool:
    """huggingface_hub's own offline switch, re-reading the env (its constant is fixed at import)."""
    from huggingface_hub import constants

    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").lower()
    return bool(constants.HF_HUB_OFFLINE) or env in _TRUE


def _hub_cache(cache_dir: Path | None) -> Path:
    """The hub cache folder, read from the environment now (huggingface_hub fixes its default at
    import; this also keeps planning free of that import): HF_HUB_CACHE, else HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(cache_home).expanduser() / "huggingface" / "hub"


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


def _require_config(folder: Path, what: str) -> None:
    if not (folder / "config.json").is_file():
        raise SourceUnavailable(
            f"{what} has no config.json: {folder}",
            hint="a model folder needs config.json, the weights (*.safetensors) and the tokenizer "
            "files, as written by `save_pretrained` or `hf download`",
        )


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


# -- the kinds -----------------------------------------------------------------------------------
class HubSource(Source):
    """A Hugging Face hub repository at a revision (a 40-hex commit costs nothing to identify)."""

    field, kind = "model", "hub"

    @classmethod
    def accepts(cls, spec: dict[str, Any]) -> bool:
        return "model" in spec and "file" not in spec

    def __init__(self, spec: dict[str, Any], base_dir: Path, cache_dir: Path | None = None) -> None:
        super().__init__(spec, base_dir)
        self.repo, self.revision = spec["model"], str(spec.get("revision") or "main")
        self.cache_dir = cache_dir

    def identity(self, stat_cache: StatCache | None, versions: VersionLookup = installed_version) -> dict:
        return {"repo": self.repo, "commit": resolve_hub_revision(self.repo, self.revision, self.cache_dir)}

    def describe(self) -> dict:
        return {"repo": self.repo, "revision": self.spec["revision"]}

    def detail(self, identity: dict) -> str:
        return f"{self.repo}@{identity.get('commit', self.revision)[:12]}"

    def status(self, cached: bool) -> str:
        return "hub"

    def config(self) -> dict | None:
        commit = self.revision if COMMIT_RE.match(self.revision) else None
        path = (_hub_cache(self.cache_dir) / f"models--{self.repo.replace('/', '--')}" / "snapshots"
                / str(commit) / "config.json") if commit else None
        return _read_json(path) if path and path.is_file() else None

    def materialize(self, ctx: Materialize) -> Path:
        return _materialize_hub(self.repo, self.revision, ctx.scratch, ctx.allow_patterns,
                                ctx.cache_dir or self.cache_dir)


class PathSource(Source):
    """A local folder in Hugging Face layout; its identity is a digest of its files (stat-cached)."""

    field, kind = "path", "path"

    @classmethod
    def accepts(cls, spec: dict[str, Any]) -> bool:
        return "path" in spec and not is_gguf_name(spec["path"])

    @property
    def folder(self) -> Path:
        return (self.base_dir / Path(self.spec["path"]).expanduser()).resolve()

    def _checked_folder(self) -> Path:
        folder = self.folder
        if not folder.is_dir():
            raise SourceUnavailable(f"source.path does not exist or is not a folder: {folder}",
                                    hint="relative paths are relative to the recipe file")
        _require_config(folder, "source.path")
        return folder

    def identity(self, stat_cache: StatCache | None, versions: VersionLookup = installed_version) -> dict:
        folder = self._checked_folder()
        manifest = tree_manifest(folder, stat_cache, confined_to=_link_roots(folder))
        return {"tree_digest": tree_digest(manifest)}

    def describe(self) -> dict:
        return {"path": str(self.folder)}

    def detail(self, identity: dict) -> str:
        return str(self.folder)

    def status(self, cached: bool) -> str:
        return "local"

    def config(self) -> dict | None:
        path = self.folder / "config.json"
        return _read_json(path) if path.is_file() else None

    def local_folder(self) -> Path | None:
        return self.folder

    def materialize(self, ctx: Materialize) -> Path:
        return self._checked_folder()


def _link_roots(folder: Path) -> list[Path]:
    """Where links in a source folder may lead: inside it; for a hub snapshot folder
    (`.../snapshots/<commit>`), also into its repository's `blobs/`, where hub links point."""
    roots = [folder]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append(folder.parent.parent / "blobs")
    return roots


class SyntheticSource(Source):
    """A tiny seeded random model the engine makes itself, once per key, kept in the store."""

    field, kind = "synthetic", "synthetic"

    def _spec(self) -> dict:
        from engine.synthetic import with_defaults

        try:
            return with_defaults(self.spec["synthetic"])
        except ValueError as exc:
            raise SourceUnavailable(f"source.synthetic: {exc}") from exc

    def identity(self, stat_cache: StatCache | None, versions: VersionLookup = installed_version) -> dict:
        from engine.synthetic import GENERATOR_VERSION

        found: dict[str, str] = {}
        for name in SYNTHETIC_LIBRARIES:
            try:
                found[name] = versions(name)
            except metadata.PackageNotFoundError:
                raise SourceUnavailable(f"a synthetic source needs {name}, which is not installed",
                                        hint="pip install 'engine[torch]'") from None
        return {"synthetic": self._spec(), "versions": found, "generator": GENERATOR_VERSION}

    def describe(self) -> dict:
        return {"synthetic": self.spec["synthetic"]}

    def detail(self, identity: dict) -> str:
        spec = self.spec["synthetic"]
        return f"synthetic {spec.get('architecture')} seed={spec.get('seed')}"

    def config(self) -> dict | None:
        return {"model_type": self.spec["synthetic"].get("architecture", "phi3"), **self._spec()}

    def materialize(self, ctx: Materialize) -> Path:
        from engine.synthetic import make_synthetic_model

        spec = self._spec()

        def make(folder: Path) -> dict:
            make_synthetic_model(spec, folder)
            return {"synthetic": self.spec["synthetic"]}

        return ctx.cached(make)


def is_gguf_name(name: Any) -> bool:
    return isinstance(name, str) and name.lower().endswith(".gguf")


class GgufSource(Source):
    """A ready-made GGUF file: `{path: x.gguf}` (identity: its sha256, stat-cached) or
    `{model: REPO, revision: SHA, file: x.gguf}` (identity: repo, commit, file; no download)."""

    field, kind, format = "file", "gguf", "gguf"

    @classmethod
    def accepts(cls, spec: dict[str, Any]) -> bool:
        return "file" in spec or ("path" in spec and is_gguf_name(spec["path"]))

    def __init__(self, spec: dict[str, Any], base_dir: Path, cache_dir: Path | None = None) -> None:
        super().__init__(spec, base_dir)
        self.cache_dir = cache_dir
        self.repo = spec.get("model")
        self.revision = str(spec.get("revision") or "main")

    @property
    def path(self) -> Path | None:
        return (self.base_dir / Path(self.spec["path"]).expanduser()).resolve() if "path" in self.spec else None

    def _checked_file(self) -> Path:
        path = self.path
        assert path is not None
        if not path.is_file():
            raise SourceUnavailable(f"source.path: no such file: {path}",
                                    hint="relative paths are relative to the recipe file")
        return path

    def identity(self, stat_cache: StatCache | None, versions: VersionLookup = installed_version) -> dict:
        if self.repo is None:
            path = self._checked_file()
            digest = stat_cache.hash(path) if stat_cache is not None else sha256_file(path)
            return {"gguf_sha256": digest}
        return {"repo": self.repo, "commit": resolve_hub_revision(self.repo, self.revision, self.cache_dir),
                "file": self.spec["file"]}

    def describe(self) -> dict:
        if self.repo is None:
            return {"path": str(self.path)}
        return {"repo": self.repo, "revision": self.spec.get("revision"), "file": self.spec["file"]}

    def detail(self, identity: dict) -> str:
        if self.repo is None:
            return str(self.path)
        return f"{self.repo}@{identity.get('commit', self.revision)[:12]}/{self.spec['file']}"

    def status(self, cached: bool) -> str:
        return "local" if self.repo is None else "hub"

    def local_file(self) -> Path | None:
        if self.repo is None:
            return self._checked_file()
        commit = self.revision if COMMIT_RE.match(self.revision) else None
        path = (_hub_cache(self.cache_dir) / f"models--{self.repo.replace('/', '--')}" / "snapshots"
                / str(commit) / self.spec["file"]) if commit else None
        return path if path and path.is_file() else None

    def materialize(self, ctx: Materialize) -> Path:
        """A folder holding just the file (a symlink to it)."""
        if self.repo is None:
            path = self._checked_file()
        else:
            path = _hub_file(self.repo, self.revision, self.spec["file"], ctx.cache_dir or self.cache_dir)
        ctx.scratch.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="gguf-", dir=ctx.scratch))
        (folder / path.name).symlink_to(os.path.realpath(path))
        return folder


def _hub_file(repo: str, revision: str, filename: str, cache_dir: Path | None) -> Path:
    import huggingface_hub

    offline = hub_offline()
    try:
        return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision,
                                                    cache_dir=_hub_cache(cache_dir), local_files_only=offline))
    except Exception as exc:  # any hub/network failure means: not available
        raise SourceUnavailable(
            f"cannot download {repo}@{revision}/{filename}: {_short_reason(exc, offline)} "
            f"(hub cache: {_hub_cache(cache_dir)})",
            hint=f"on a connected machine run `hf download {repo} {filename} --revision {revision}` and copy "
                 "its hub cache here, or download the file and use `source: {path: file.gguf}`",
        ) from exc


#: recipe key -> the type that handles it; a new kind of source adds one line here
SOURCE_TYPES: dict[str, type[Source]] = {cls.field: cls for cls in (HubSource, PathSource, SyntheticSource,
                                                                    GgufSource)}


def source_from_recipe(spec: dict[str, Any], base_dir: Path) -> Source:
    """The Source for a recipe's `source:` mapping (the schema guarantees exactly one form)."""
    kinds = [cls for cls in SOURCE_TYPES.values() if cls.accepts(spec)]
    if len(kinds) != 1:
        forms = ", ".join(f"`{k}`" for k in SOURCE_TYPES)
        raise SourceUnavailable(f"source needs exactly one of {forms}",
                                hint="for example `source: {model: org/name, revision: <commit sha>}` "
                                     "or `source: {path: ./my-model}`")
    return kinds[0](spec, base_dir)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _download_progress() -> type:
    """A tqdm stand-in for snapshot_download: its bytes bar becomes an engine.progress task (live on a
    terminal, one summary line in CI), its other bars show nothing."""
    from tqdm.auto import tqdm

    from .progress import task

    class Bytes(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            counted = kwargs.get("unit") == "B"
            kwargs.pop("name", None)
            super().__init__(*args, **{**kwargs, "disable": True})
            self._task = task("downloading", unit="B") if counted else None
            self._count = 0.0

        def update(self, n: float | None = 1) -> None:
            if self._task is not None:
                self._task.total = self.total or None
                self._task.advance(n or 0)

        def close(self) -> None:
            if self._task is not None:
                self._task.finish()
            super().close()

    return Bytes


def _materialize_hub(repo: str, revision: str, dest_parent: Path, allow_patterns: list[str] | None,
                     cache_dir: Path | None) -> Path:
    """The snapshot folder in the hub cache (downloaded unless offline); when `allow_patterns`
    leaves out cached files, a folder of symlinks to just the allowed files under `dest_parent`."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    offline = hub_offline()
    try:
        snapshot = Path(
            huggingface_hub.snapshot_download(
                repo,
                revision=revision,
                allow_patterns=allow_patterns,
                cache_dir=_hub_cache(cache_dir),
                local_files_only=offline,
                tqdm_class=_download_progress(),
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
    return folder


from engine import variant_source  # noqa: E402,F401 - registers `source: {variant: ...}` in SOURCE_TYPES
