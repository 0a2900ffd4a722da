"""Read-only questions about the registry, answered as documents the CLI renders (ls, show, diff)."""
from __future__ import annotations

import fnmatch
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import RegistryNotFound
from .paths import Locations, resolve
from .records import ListedVariant
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


#: `engine ls --sort` keys -> (sort key of a ListedVariant, reversed); missing values sort last
SORTS: dict[str, tuple[Callable[[ListedVariant], Any], bool]] = {
    "name": (lambda v: (v.name, v.version), False),
    "size": (lambda v: (v.size_bytes is None, v.size_bytes or 0), False),
    "ppl": (lambda v: _score_key(v, "perplexity"), False),
    "kl": (lambda v: _score_key(v, "kl_divergence"), False),
    "created": (lambda v: v.created or "", True),  # newest first
}


def _score_key(v: ListedVariant, metric: str) -> tuple[bool, float]:
    score = v.scores.get(metric)
    return (score is None, score["value"] if score else 0.0)


def list_variants(locations: Locations | None = None, *, all_versions: bool = False,
                  patterns: tuple[str, ...] = (), runtime: str | None = None, dtype: str | None = None,
                  sort: str = "name", limit: int | None = None) -> list[ListedVariant]:
    """The variants `engine ls` shows (latest versions unless all_versions), filtered by name glob
    patterns (any may match), runtime and weight dtype, ordered by `sort` (SORTS), at most `limit`.
    Empty without a registry."""
    locations = locations or resolve()
    if not locations.registry.exists():
        return []
    rows = with_registry(locations, lambda reg: reg.listing(all_versions=all_versions, runtime=runtime, dtype=dtype))
    if patterns:
        rows = [v for v in rows if any(fnmatch.fnmatchcase(v.name, p) for p in patterns)]
    if sort != "name":
        key, newest_first = SORTS[sort]
        rows.sort(key=key, reverse=newest_first)
    return rows[:limit] if limit is not None else rows


def score_methods(method_ids: set[str], locations: Locations | None = None) -> dict[str, dict]:
    """method_id -> method, for the footnotes of `engine ls` (read only when methods differ)."""
    return with_registry(locations, lambda reg: reg.methods(method_ids)) if method_ids else {}


def show(ref: str, locations: Locations | None = None) -> dict[str, Any]:
    """Everything recorded about one variant, with what its runtime adds (engine show)."""
    from .discovery import UnknownRuntime, get_runtime  # not at the top: `engine ls` never needs a runtime
    from .recipe import defaulted_fields
    from .render import show_doc

    def collect(reg: Registry) -> dict[str, Any]:
        variant = reg.get(ref)
        meta = reg.artifact_meta(variant.artifact_key)
        try:
            runtime = get_runtime(variant.runtime)
            sections, hidden = runtime.show_sections(meta), runtime.hidden_meta
        except UnknownRuntime:  # its plugin is not installed here: the record still shows
            sections, hidden = [], ()
        doc = show_doc(variant, reg.files(variant.artifact_key), reg.steps(variant.id), reg.scores(variant),
                       meta, sections, hidden)
        doc["defaults"] = defaulted_fields(variant.recipe, variant.recipe_text)
        if variant.source_kind == "variant":  # built from another variant: the chain back to a checkpoint
            from .variant_source import lineage

            doc["lineage"] = lineage(reg, variant)
        return doc

    return with_registry(locations, collect)


def diff(a: str, b: str, locations: Locations | None = None) -> dict[str, Any]:
    """Two variants compared: recipe fields, files (same bytes or not), like-for-like scores."""
    from .diff import diff_variants

    def collect(reg: Registry) -> dict[str, Any]:
        va, vb = reg.get(a), reg.get(b)
        return diff_variants(va, vb, reg.files(va.artifact_key), reg.files(vb.artifact_key),
                             reg.scores(va), reg.scores(vb),
                             reg.artifact_meta(va.artifact_key).get("weights", {}),
                             reg.artifact_meta(vb.artifact_key).get("weights", {}))

    return with_registry(locations, collect)
