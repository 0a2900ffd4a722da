"""Run a sweep's variants as Ray tasks (`engine apply SWEEP.yaml --executor ray [--address ADDRESS]`).

Imported only for `--executor ray`, so Ray stays out of every other path. The driver (this process)
plans, makes the shared sources once and registers; each variant's missing steps run as one task
asking for its resources: one CPU, the variant's memory estimate, one GPU when the recipe targets a
GPU device. Tasks write into the store, which every node must see at the same path (docs/scale.md).
A worker or node lost mid-build is retried by Ray (`max_retries`) and then reported failed;
nothing of it was registered.
"""
from __future__ import annotations

import logging
import os
import time

import ray
import ray.exceptions

from .errors import EngineError
from .executors import Done, Executor, Task, WorkerLost, portable, work
from .paths import Locations
from .recipe import Recipe


def _task(recipe: Recipe, locations: Locations, force: bool,
          max_memory: int | None = None) -> tuple[str, Done | EngineError]:
    """One variant on a Ray worker; a user's or a backend's error comes back as a value."""
    try:
        return "done", work(recipe, locations, force, max_memory)
    except EngineError as error:
        return "error", portable(error)


_remote_task = ray.remote(_task)


class RayExecutor(Executor):
    """Variants as Ray tasks on the cluster at `address` (None: $RAY_ADDRESS, else a local one)."""

    def __init__(self, address: str | None = None, retries: int = 1, cpus: float = 1) -> None:
        self.address, self.retries, self.cpus = address, retries, cpus

    def _connect(self) -> bool:
        """Connect (or start a local cluster); True when this process must shut Ray down after."""
        if ray.is_initialized():
            return False
        options = dict(ignore_reinit_error=True, log_to_driver=False, logging_level=logging.WARNING)
        # Ray's notice that its default token authentication is on: not the user's concern on every apply
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        if self.address is None and not os.environ.get("RAY_ADDRESS"):  # this machine alone, gone with us
            options["include_dashboard"] = False
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise EngineError(f"cannot reach the Ray cluster at {self.address or '$RAY_ADDRESS'}: {error}",
                              hint="start one with `ray start --head` and pass its address (host:6379)") from None
        return True

    @staticmethod
    def _largest_node_memory() -> float | None:
        sizes = [n["Resources"].get("memory", 0) for n in ray.nodes() if n.get("Alive")]
        return max(sizes) if sizes else None

    def _submit(self, task: Task, locations: Locations, force: bool, largest: float | None):
        options: dict = {"num_cpus": self.cpus, "max_retries": self.retries, "name": task.name}
        if task.estimate:  # a variant larger than every node still runs, alone on the largest one
            options["memory"] = int(min(task.estimate, largest)) if largest else task.estimate
        if task.gpus:
            options["num_gpus"] = task.gpus
        return _remote_task.options(**options).remote(task.recipe, locations, force, task.max_memory)

    def run(self, tasks, locations, force, started):
        shutdown = self._connect()
        refs: dict = {}
        try:
            largest = self._largest_node_memory()
            for task in tasks:
                refs[self._submit(task, locations, force, largest)] = task
                started(task, "sent to the Ray cluster")
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.5)  # short: Ctrl-C is seen between
                if not ready:
                    continue
                task = refs.pop(ready[0])
                try:
                    kind, payload = ray.get(ready[0])
                except ray.exceptions.RayTaskError as error:  # a bug in the engine on the worker
                    payload = EngineError(f"{task.name}: the Ray task failed: {str(error.cause or error)[:400]}")
                except ray.exceptions.RayError as error:  # the worker or its node died, retries spent
                    payload = WorkerLost(
                        f"{task.name}: its Ray worker was lost ({type(error).__name__}) after "
                        f"{self.retries} retr{'y' if self.retries == 1 else 'ies'}; nothing was registered",
                        hint="a killed worker, the out-of-memory killer or a lost node; apply again")
                yield task, payload
        finally:  # Ctrl-C or an error: cancel what still runs (force kills the worker and its build child)
            for ref in refs:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - finished meanwhile, or the cluster is gone
                    pass
            if shutdown:
                time.sleep(0.1)
                ray.shutdown()
