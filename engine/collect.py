"""Free the store entries that no registered variant references (engine.gc; the module is not named gc so
it never shadows that function on the package)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .paths import Locations, resolve
from .registry import Registry
from .store import Store


@dataclass(frozen=True)
class Freed:
    key: str
    size: int


@dataclass
class GcReport:
    dry_run: bool
    entries: list[Freed] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries)


def gc(locations: Locations | None = None, *, dry_run: bool = False, registry: str | Path | None = None,
       store: str | Path | None = None) -> GcReport:
    """Delete (or, with dry_run, list) store entries no variant of the registry references."""
    locations = locations or resolve(registry, store)
    entries = Store(locations.store)
    keep = _referenced(locations) if locations.registry.exists() else set()
    report = GcReport(dry_run)
    for key in entries.keys():
        if key in keep:
            continue
        entry = entries.get(key)
        if not dry_run:
            with entries.lock(key):
                entries.remove(key)
        report.entries.append(Freed(key, entry.size if entry else 0))
    if not dry_run:
        entries.sweep_staging()
    return report


def _referenced(locations: Locations) -> set[str]:
    registry = Registry(locations.registry)
    try:
        return registry.referenced_keys()
    finally:
        registry.close()
