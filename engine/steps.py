"""One runner for every cached step (source, build, reference, eval, and what comes next).

A step is reused when its key is in the store; otherwise, under the key's lock (a concurrent
apply waits, then finds the entry), its work writes into a private staging folder that is hashed,
given a manifest and published with one rename. A step that fails keeps its logs under
`<store>/failed/` and names them in the error's hint. While a step works, everything the libraries
write to stdout/stderr goes to its logs/output.log (engine.quiet), never to the user's terminal.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ENVIRONMENT_ERRNOS, EngineError, os_error_text, store_error
from .quiet import captured
from .records import StepRecord
from .store import Entry, Staging, Store

#: what the libraries a step runs in-process print (warnings, C++ log lines), beside the tools' build.log
OUTPUT_LOG = "output.log"

#: progress(message, detail): detail=True for a tool's own output lines (shown only live)
Progress = Callable[[str, bool], None]


def quiet(message: str, detail: bool = False) -> None:
    """A progress callback that shows nothing."""


@dataclass
class StepPlan:
    """One planned step: its key and what went into it, and whether the store has it."""

    kind: str  # "source" | "build" | "reference" | "eval"
    key: str
    params: dict
    versions: dict
    status: str  # "cached" | "missing" | "local" | "hub"
    detail: str = ""
    inputs: dict = field(default_factory=dict)  # what the work gets: params plus "_..." inputs
    #: bytes the step must have free at its peak (engine.memory; None: unknown), set by make_plan
    memory_estimate: int | None = None
    memory_note: str = ""  # how that was estimated (and the peak RSS with mapped checkpoint pages)

    @property
    def hit(self) -> bool:
        return self.status in ("cached", "local")

    def record(self, cached: bool, seconds: float = 0.0) -> StepRecord:
        return StepRecord(self.kind, self.key, cached, seconds, self.params, self.versions)


Work = Callable[[Staging], "dict | None"]


def run_step(store: Store, step: StepPlan, work: Work, ran: list[StepRecord], progress: Progress = quiet,
             *, force: bool = False, message: str | None = None) -> Entry:
    """The store entry for `step.key`: reused, or made by `work(stage)` and committed.

    `work` returns facts for the manifest's meta. A step that ran is appended to `ran`. A full,
    read-only or forbidden store becomes one StoreUnavailable naming the path.
    """
    entry = None if force else store.get(step.key)
    if entry is not None:
        return entry
    try:
        return _run_locked(store, step, work, ran, progress, force, message)
    except OSError as error:
        if isinstance(error, EngineError) or error.errno not in ENVIRONMENT_ERRNOS:
            raise
        raise store_error(store.root, error) from error


def _run_locked(store: Store, step: StepPlan, work: Work, ran: list[StepRecord], progress: Progress,
                force: bool, message: str | None) -> Entry:
    """Under the key's lock: re-check the store, then run the work in staging and commit it."""
    with store.lock(step.key):
        entry = None if force else store.get(step.key)  # made meanwhile by another apply?
        if entry is not None:
            return entry
        started = time.perf_counter()
        progress(message or f"{step.kind}: {step.detail}", False)
        with store.staging(step.key) as stage:
            try:
                with captured(stage.logs_dir / OUTPUT_LOG):  # libraries' own output: the log, not the user
                    meta = work(stage) or {}
            except EngineError as error:
                if any(stage.logs_dir.iterdir()):
                    logs = f"full log: {_keep_failed_logs(store, stage.logs_dir, step.key)}"
                    error.hint = f"{error.hint}; {logs}" if error.hint else logs
                raise
            entry = store.commit(stage, step.kind, meta)
        ran.append(step.record(False, time.perf_counter() - started))
    return entry


def _keep_failed_logs(store: Store, logs_dir: Path, key: str) -> str:
    """Where the failed step's logs were kept; a copy that fails (a full disk) must not hide the
    step's own error, so it only says why the logs are not there."""
    target = store.root / "failed" / f"{key}.{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        shutil.copytree(logs_dir, target, dirs_exist_ok=True)
    except OSError as error:
        shutil.rmtree(target, ignore_errors=True)
        return f"not kept: copying them to {target} failed ({os_error_text(error)})"
    return str(target)
