"""`engine apply SWEEP.yaml --jobs N`: up to N variants at once, each in a worker process of its own.

A worker is a fresh interpreter (spawn: no locks or threads inherited from the driver) that runs one
variant's missing steps and sends back what it ran; its build children die with it. Admission keeps
the sum of the running variants' memory estimates inside MemAvailable. A worker that dies without
a result (a kill, the out-of-memory killer) is run again up to `retries` times.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import time
from collections import deque
from multiprocessing.connection import wait as wait_any

from .errors import EngineError
from .executors import Executor, Task, WorkerLost, portable, work
from .memory import available_memory
from .paths import Locations
from .recipe import Recipe
from .subproc import _die_with_parent as die_with_parent  # the build children's own guard


def _child(conn, recipe: Recipe, locations: Locations, force: bool, max_memory: int | None = None) -> None:
    """A local worker process: one variant, its result (or its error) sent down the pipe. It dies
    with the driver (kill -9 included), and its build child with it."""
    die_with_parent()
    try:
        try:
            conn.send(("done", work(recipe, locations, force, max_memory)))
        except EngineError as error:
            conn.send(("error", portable(error)))
        except Exception as error:  # noqa: BLE001 - a bug: reported as this variant's failure, not retried
            conn.send(("error", EngineError(f"{recipe.name}: the worker failed: {type(error).__name__}: {error}")))
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: the staging folder is gone already
        os._exit(130)


class LocalExecutor(Executor):
    """Up to `jobs` variants at once in child processes on this machine, admitted so the sum of
    their memory estimates fits MemAvailable (a variant without an estimate needs only a slot;
    one larger than the whole budget runs alone)."""

    def __init__(self, jobs: int, retries: int = 1, budget: int | None = None) -> None:
        self.jobs, self.retries = max(1, jobs), retries
        self.budget = budget if budget is not None else available_memory()

    def _fits(self, task: Task, running: list[Task]) -> bool:
        if not running:
            return True
        if task.estimate is None or self.budget is None:
            return True
        return sum(t.estimate or 0 for t in running) + task.estimate <= self.budget

    def run(self, tasks, locations, force, started):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited locks or threads
        pending = deque(tasks)
        running: dict[object, tuple[Task, multiprocessing.Process]] = {}
        try:
            while pending or running:
                while pending and len(running) < self.jobs:
                    active = [t for t, _ in running.values()]
                    task = next((t for t in pending if self._fits(t, active)), None)
                    if task is None:
                        break
                    pending.remove(task)
                    ours, theirs = context.Pipe(duplex=False)
                    proc = context.Process(target=_child, args=(theirs, task.recipe, locations, force, task.max_memory),
                                           name=f"engine-{task.name}", daemon=True)
                    proc.start()
                    theirs.close()  # only the child holds its end: its death is an EOF here
                    running[ours] = (task, proc)
                    started(task, f"building in process {proc.pid}")
                for conn in wait_any(list(running)):
                    task, proc = running.pop(conn)
                    try:
                        kind, payload = conn.recv()
                    except (EOFError, OSError):
                        kind, payload = "lost", None
                    conn.close()
                    proc.join()
                    if kind != "lost":
                        yield task, payload
                        continue
                    task.attempts += 1
                    if task.attempts <= self.retries:
                        pending.appendleft(task)
                        continue
                    how = f"was killed by signal {-proc.exitcode}" if (proc.exitcode or 0) < 0 else \
                        f"exited ({proc.exitcode}) without a result"
                    yield task, WorkerLost(
                        f"{task.name}: its worker process {how}, {task.attempts} time(s); nothing was registered",
                        hint="a kill or the out-of-memory killer; run with fewer --jobs or apply again")
        finally:  # Ctrl-C or an error here: stop what runs (their build children die with them)
            _stop([proc for _, proc in running.values()])


def _stop(procs: list) -> None:
    """SIGINT each worker (it cleans its staging folder), then kill what is still there after 5 s."""
    for proc in procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 5
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
