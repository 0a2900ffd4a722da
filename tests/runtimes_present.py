"""The runtimes this test run can use: every one the `engine.runtimes` entry points name whose
distributions are installed. Tests that drive every runtime take them from here, so a new runtime
joins them by declaring itself (with its example_quantization)."""
from __future__ import annotations

from engine.discovery import get_runtime, runtime_names
from engine.errors import RuntimeUnavailable
from engine.runtime import Runtime
from engine.versions import versions_of


def unavailable(runtime: Runtime) -> str | None:
    """Why the runtime cannot run here, or None."""
    try:
        versions_of(runtime.distributions, needed_by=f"runtime '{runtime.name}'", extra=runtime.extra)
        runtime.check_available({"source": {"synthetic": {}}, "target": {"device": runtime.devices[0], "options": {}},
                                 "quantization": dict(runtime.example_quantization)})
    except RuntimeUnavailable as error:
        return f"{error.message} ({error.hint})"
    return None


def ready_runtimes() -> list[str]:
    return [name for name in runtime_names() if unavailable(get_runtime(name)) is None]
