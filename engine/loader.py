"""engine.load(): a registry name -> a ready model of the right runtime."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from .discovery import get_runtime
from .errors import BackendFailed, EngineError, RegistryNotFound, VerificationFailed
from .paths import resolve
from .quiet import captured
from .registry import Registry
from .runtime import Model
from .store import Store
from .verification import verify_variant


def load(ref: str, *, verify: bool = False, registry: str | Path | None = None,
         store: str | Path | None = None, **options: Any) -> Model:
    """Load variant NAME (latest version) or NAME@VERSION.

    verify=True re-hashes every file against the registry first and refuses on any difference.
    Extra keyword options go to the runtime's loader (each runtime lists its load_options). What the
    backend's libraries print while loading goes to <store>/logs/load.log.
    """
    locations = resolve(registry, store)
    if not locations.registry.exists():
        raise RegistryNotFound(f"no registry at {locations.registry}",
                               hint="run `engine apply RECIPE.yaml` first, or pass registry= / set ENGINE_REGISTRY")
    reg = Registry(locations.registry, readonly=True)
    try:
        record = reg.get(ref)
        st = Store(locations.store)
        if verify:
            report = verify_variant(reg, st, record)
            if not report.ok:
                raise VerificationFailed(
                    f"{report.variant} does not match the registry; refusing to load",
                    report.problems, hint="`engine verify` lists every difference; re-apply the recipe with --force to rebuild",
                )
    finally:
        reg.close()
    artifact_dir = st.entry_path(record.artifact_key) / "files"
    if not artifact_dir.is_dir():
        raise VerificationFailed(f"{record.ref}: artifact folder is missing: {artifact_dir}",
                                 [str(artifact_dir)], hint="re-apply its recipe to rebuild it")
    record = replace(record, artifact_dir=str(artifact_dir))
    runtime = get_runtime(record.runtime)
    try:
        with captured(locations.store / "logs" / "load.log"):  # import and load chatter: the log, not the user
            return runtime.load(artifact_dir, record, **options)
    except EngineError:
        raise
    except Exception as error:  # the backend's failure: one message, never its traceback
        said = " ".join(str(error).split())[:400] or type(error).__name__
        raise BackendFailed(f"{runtime.name} could not load {record.ref}: {said}",
                            hint=f"`engine verify {record.ref}` checks its files; re-apply its recipe with "
                                 "--force to rebuild it") from error
