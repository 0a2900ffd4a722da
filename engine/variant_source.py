"""A registered variant as the source of another recipe: `source: {variant: NAME}` or `NAME@V`.

The source's key is the parent's artifact key (the store entry the parent's build made), so a rebuilt
parent (a new artifact) gives the child a new key and rebuilds it. The parent's artifact must be a
Hugging Face checkpoint (a runtime with `artifact_format = "hf"`: transformers). Its weights are
already quantized: engine.quantized_sources refuses a recipe that would quantize them again, unless
the recipe asks for `dequantize: true`, which expands them to float exactly (a cached source step)
before the child quantizes.

The registry the variant is looked up in (and the store its artifact lies in) are the apply's own
(`using_locations`, set by the pipeline), else the default locations (engine.paths). Lineage is read back from the registry rows
(source_kind "variant", source_identity.artifact) for `engine show` and `engine rm`.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from .errors import SourceUnavailable
from .hashing import StatCache
from .sources import SOURCE_TYPES, Materialize, Source
from .versions import VersionLookup, installed_version

_LOCATIONS: ContextVar[Any] = ContextVar("engine_variant_locations", default=None)


@contextlib.contextmanager
def using_locations(locations: Any) -> Iterator[None]:
    """Variant sources planned inside resolve against this registry and store (engine.paths.Locations)."""
    token = _LOCATIONS.set(locations)
    try:
        yield
    finally:
        _LOCATIONS.reset(token)


def _locations() -> Any:
    from .paths import resolve

    return _LOCATIONS.get() or resolve()


class VariantSource(Source):
    """A registered variant's artifact folder (a Hugging Face checkpoint)."""

    field, kind = "variant", "variant"

    def __init__(self, spec: dict[str, Any], base_dir: Path) -> None:
        super().__init__(spec, base_dir)
        self.ref = str(spec["variant"])
        self.dequantize = bool(spec.get("dequantize", False))
        self.parent: Any = None  # the VariantRecord, once resolved

    def resolve(self) -> Any:
        """The parent's registry record; SourceUnavailable (with did-you-mean) when it is not registered."""
        if self.parent is None:
            from .errors import VariantNotFound
            from .registry import Registry

            path = _locations().registry
            if not path.exists():
                raise SourceUnavailable(f"no registry at {path} to find '{self.ref}' in",
                                        hint="apply the parent's recipe first (same --registry)")
            registry = Registry(path, readonly=True)
            try:
                self.parent = registry.get(self.ref)
                self.lineage = lineage(registry, self.parent)
            except VariantNotFound as error:
                raise SourceUnavailable(error.message, hint=error.hint) from None
            finally:
                registry.close()
        return self.parent

    @property
    def format(self) -> str:  # type: ignore[override]
        from .discovery import UnknownRuntime, get_runtime

        parent = self.resolve()
        try:
            return getattr(get_runtime(parent.runtime), "artifact_format", None) or f"{parent.runtime} artifact"
        except UnknownRuntime:
            return f"{parent.runtime} artifact"

    def identity(self, stat_cache: StatCache | None, versions: VersionLookup = installed_version) -> dict:
        parent = self.resolve()
        identity = {"variant": parent.ref, "artifact": parent.artifact_key, "runtime": parent.runtime}
        if self.dequantize:
            identity["dequantize"] = True
            identity["versions"] = {d: versions(d) for d in ("torch", "transformers", "compressed-tensors")}
        return identity

    def store_key(self, identity: dict) -> str | None:
        """The parent's artifact key itself (a dequantized copy is a step of its own)."""
        return None if identity.get("dequantize") else identity["artifact"]

    def describe(self) -> dict:
        parent = self.resolve()
        out = {"variant": parent.ref, "artifact": parent.artifact_key, "lineage": self.lineage}
        if self.dequantize:
            out["dequantize"] = True
        return out

    def detail(self, identity: dict) -> str:
        return f"variant {identity['variant']}" + (" (dequantized to float)" if identity.get("dequantize") else "")

    def status(self, cached: bool) -> str:
        return "cached" if cached else "missing"

    def config(self) -> dict | None:
        try:
            return json.loads((self._folder() / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _folder(self) -> Path:
        from .store import Store

        return Store(_locations().store).entry_path(self.resolve().artifact_key) / "files"

    def materialize(self, ctx: Materialize) -> Path:
        folder = self._folder()
        if not (folder / "config.json").is_file():
            raise SourceUnavailable(f"source.variant: the artifact of {self.parent.ref} is not in the store "
                                    f"({folder})", hint=f"apply {self.parent.name}'s recipe again to rebuild it")
        if not self.dequantize:
            return folder

        def make(out: Path) -> dict:
            from .dequantize import dequantize_checkpoint

            return dequantize_checkpoint(folder, out)

        return ctx.cached(make)


def lineage(registry: Any, variant: Any, limit: int = 32) -> list[str]:
    """[variant, its source variant, that one's source, ..., the checkpoint it all started from],
    nearest first."""
    chain = [variant.ref]
    current = variant
    while current.source_kind == "variant" and len(chain) < limit:
        ref = (current.source.get("identity") or {}).get("variant")
        if not ref:
            break
        try:
            current = registry.get(ref)
        except Exception:  # noqa: BLE001 - a removed parent ends the chain, shown as such
            chain.append(f"{ref} (removed)")
            break
        chain.append(current.ref)
    else:
        if current.source_kind != "variant":  # the checkpoint the chain starts from
            described = (current.source or {}).get("description") or {}
            chain.append(f"{current.source_kind} " + ", ".join(f"{k}={v}" for k, v in sorted(described.items())))
    return chain


def children(registry: Any, artifact_keys: set[str]) -> list[Any]:
    """Registered variants whose source is one of these artifacts."""
    rows = registry.query("select * from variants where source_kind = 'variant' order by name, version")
    from .records import VariantRecord

    found = []
    for row in rows:
        identity = json.loads(row.get("source_identity") or "{}")
        if identity.get("artifact") in artifact_keys:
            found.append(VariantRecord.from_row(row))
    return found


SOURCE_TYPES[VariantSource.field] = VariantSource
