"""Read-only questions about the registry, answered as documents the CLI renders (ls, show, diff)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .discovery import UnknownRuntime, get_runtime
from .errors import RegistryNotFound
from .paths import Locations, resolve
from .records import ScoreRecord, VariantRecord
from .registry import Registry

T = TypeVar("T")


def with_registry(locations: Locations | None, fn: Callable[[Registry], T], *, readonly: bool = True) -> T:
    """Run fn(registry); reading never creates or writes a registry file (so it works read-only)."""
    locations = locations or resolve()
    if not locations.registry.exists():
        raise RegistryNotFound(f"no registry at {locations.registry}",
                              hint="run `engine apply RECIPE.yaml` first, or pass --registry / set ENGINE_REGISTRY")
    registry = Registry(locations.registry, readonly=readonly)
    try:
        return fn(registry)
    finally:
        registry.close()


def list_variants(locations: Locations | None = None, *, all_versions: bool = False
                  ) -> list[tuple[VariantRecord, dict[str, ScoreRecord]]]:
    """Every variant (latest versions unless all_versions) with its scores; empty without a registry."""
    locations = locations or resolve()
    if not locations.registry.exists():
        return []
    return with_registry(locations, lambda reg: [(v, reg.scores(v)) for v in reg.variants(all_versions=all_versions)])


def show(ref: str, locations: Locations | None = None) -> dict[str, Any]:
    """Everything recorded about one variant, with what its runtime adds (engine show)."""
    from .render import show_doc

    def collect(reg: Registry) -> dict[str, Any]:
        variant = reg.get(ref)
        meta = reg.artifact_meta(variant.artifact_key)
        try:
            runtime = get_runtime(variant.runtime)
            sections, hidden = runtime.show_sections(meta), runtime.hidden_meta
        except UnknownRuntime:  # its plugin is not installed here: the record still shows
            sections, hidden = [], ()
        return show_doc(variant, reg.files(variant.artifact_key), reg.steps(variant.id), reg.scores(variant),
                        meta, sections, hidden)

    return with_registry(locations, collect)


def diff(a: str, b: str, locations: Locations | None = None) -> dict[str, Any]:
    """Two variants compared: recipe fields, files (same bytes or not), like-for-like scores."""
    from .diff import diff_variants

    def collect(reg: Registry) -> dict[str, Any]:
        va, vb = reg.get(a), reg.get(b)
        return diff_variants(va, vb, reg.files(va.artifact_key), reg.files(vb.artifact_key),
                             reg.scores(va), reg.scores(vb))

    return with_registry(locations, collect)
