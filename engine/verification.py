"""Re-hash a variant's files and compare them with what the registry recorded at apply time."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .hashing import sha256_file
from .paths import Locations
from .records import VariantRecord
from .registry import Registry
from .store import Store


@dataclass
class VerifyReport:
    variant: str  # name@version
    artifact_dir: Path
    checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_variant(registry: Registry, store: Store, variant: VariantRecord) -> VerifyReport:
    """Every recorded file must exist with the recorded size and sha256 (full re-hash, no cache)."""
    report = VerifyReport(variant.ref, store.entry_path(variant.artifact_key) / "files")
    recorded = registry.files(variant.artifact_key)
    if not recorded:
        report.problems.append("the registry lists no files for this variant")
    if not report.artifact_dir.is_dir():
        report.problems.append(f"artifact folder is missing: {report.artifact_dir}")
        return report
    for f in recorded:
        path = report.artifact_dir / f["path"]
        report.checked += 1
        if not path.is_file():
            report.problems.append(f"missing: {path}")
        elif path.stat().st_size != f["size"]:
            report.problems.append(f"changed (size {path.stat().st_size} != {f['size']}): {path}")
        elif sha256_file(path) != f["sha256"]:
            report.problems.append(f"changed (sha256 differs): {path}")
    known = {f["path"] for f in recorded}
    for path in sorted(p for p in report.artifact_dir.rglob("*") if p.is_file()):
        if path.relative_to(report.artifact_dir).as_posix() not in known:
            report.problems.append(f"unexpected file: {path}")
    return report


def verify(ref: str | None = None, locations: Locations | None = None, *, registry: str | Path | None = None,
           store: str | Path | None = None) -> list[VerifyReport]:
    """Verify one variant (NAME or NAME@V) or every version of every variant in the registry."""
    from .errors import VariantNotFound
    from .paths import resolve

    locations = locations or resolve(registry, store)
    if not locations.registry.exists():
        raise VariantNotFound(f"no registry at {locations.registry}",
                              hint="run `engine apply RECIPE.yaml` first, or pass --registry / set ENGINE_REGISTRY")
    opened = Registry(locations.registry)
    try:
        entries = Store(locations.store)
        variants = [opened.get(ref)] if ref else opened.variants(all_versions=True)
        return [verify_variant(opened, entries, v) for v in variants]
    finally:
        opened.close()
