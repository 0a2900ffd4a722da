"""Free the store entries that no registered variant references (engine.gc; the module is not named gc so
it never shadows that function on the package).

A store may be shared by several registries (`ENGINE_STORE`), so "unused" means unused by every
registry the store lists under `registries/` (each apply and gc adds its own). gc refuses rather
than guess: when its own registry does not exist (a typo would otherwise mean "nothing is used"),
when a listed registry is missing or unreadable (`--forget PATH` drops one deleted on purpose), and
while an apply is in progress (its work is not registered yet).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EngineError, GcRefused, RegistryNotFound
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
    registries: list[Path] = field(default_factory=list)  # whose references were kept

    @property
    def bytes(self) -> int:
        return sum(e.size for e in self.entries)


def gc(locations: Locations | None = None, *, dry_run: bool = False, registry: str | Path | None = None,
       store: str | Path | None = None, forget: Iterable[str | Path] = ()) -> GcReport:
    """Delete (or, with dry_run, list) the store entries no registry sharing the store references."""
    locations = locations or resolve(registry, store)
    entries = Store(locations.store)
    if not locations.registry.is_file():
        entries.check_idle()  # a first apply in progress has no registry file yet: say that instead
        raise RegistryNotFound(f"no registry at {locations.registry}; gc deletes nothing",
                               hint="pass the registry that uses this store (--registry / ENGINE_REGISTRY)")
    with entries.collecting():
        for path in forget:
            entries.forget(Path(path).resolve())
        entries.attach(locations.registry.resolve())
        report = GcReport(dry_run, registries=entries.registries())
        keep = set().union(*(_referenced(path, entries) for path in report.registries))
        for key in entries.keys():
            if key not in keep:
                report.entries.append(_free(entries, key, dry_run))
        if not dry_run:
            entries.sweep_staging()
    return report


def _free(entries: Store, key: str, dry_run: bool) -> Freed:
    entry = entries.get(key)
    if not dry_run:
        with entries.lock(key):
            entries.remove(key)
    return Freed(key, entry.size if entry else 0)


def _referenced(path: Path, store: Store) -> set[str]:
    """The keys one registry uses; GcRefused when it cannot be read (then nothing is provably free)."""
    hint = (f"if {path} was deleted on purpose, run `engine gc --forget {path}`; "
            "otherwise restore it (or make it readable) first")
    if not path.is_file():
        raise GcRefused(f"the registry {path} uses the store {store.root} but does not exist; gc deletes nothing",
                        hint=hint)
    try:
        registry = Registry(path, readonly=True)
        try:
            return registry.referenced_keys()
        finally:
            registry.close()
    except EngineError as error:
        raise GcRefused(f"cannot read the registry {path}, which uses the store {store.root} ({error.message}); "
                        "gc deletes nothing", hint=hint) from error
