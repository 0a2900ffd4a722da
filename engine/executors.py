"""Run a sweep's variants in parallel: the driver side every executor shares, and the worker's job.

The driver plans every variant, makes each shared source once, hands the variants whose steps are
missing to workers (processes in engine.local_executor, Ray tasks in engine.ray_executor), and registers each
result as it arrives, in one registry transaction per variant as a serial apply does. Workers only
write into the store (each step under its key's lock, committed with one rename), so a worker killed
mid-build leaves nothing registered; it is retried (`retries`) or reported failed, and the others go
on. The same keys, so the same bytes, as a serial apply: the driver checks that a worker built the
key the driver planned.
"""
from __future__ import annotations

import contextlib
import pickle
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .admission import check_fits, choose_reference_pass, memory_bound
from .errors import EngineError
from .paths import Locations
from .pipeline import ApplyResult, Outcome, SweepResult, _applying, _materialize, _register, apply_recipe, run_steps
from .plan import Plan, make_plan
from .recipe import Recipe
from .recipe.matrix import Skipped
from .records import StepRecord
from .steps import Progress, quiet
from .store import Store
from .variant_source import using_locations

__all__ = ["Done", "Executor", "KeyMismatch", "Task", "WorkerLost", "make_executor", "portable", "work"]


class WorkerLost(EngineError):
    """A worker died (killed, out of memory, its node gone) before its variant finished."""


class KeyMismatch(EngineError):
    """A worker built another key than the driver planned: the two machines differ."""


@dataclass
class Task:
    """One variant handed to a worker."""

    index: int
    recipe: Recipe
    estimate: int | None  # bytes the variant's largest missing step needs (None: unknown)
    gpus: int = 0
    max_memory: int | None = None  # the user's --max-memory: the worker's reference pass honours it too
    attempts: int = 0

    @property
    def name(self) -> str:
        return self.recipe.name


@dataclass
class Done:
    """What a worker sends back: the steps it ran and the keys to register."""

    ran: list[StepRecord]
    build_key: str
    evaluation: dict | None
    seconds: float


def work(recipe: Recipe, locations: Locations, force: bool, max_memory: int | None = None) -> Done:
    """A worker's whole job for one variant: plan it here, run its missing steps into the store."""
    started = time.perf_counter()
    store = Store(locations.store)
    with using_locations(locations):  # a `source: {variant: ...}` resolves in the driver's registry
        plan = make_plan(recipe, store)
    bound = memory_bound(max_memory)  # this node's: whole or layer-by-layer reference pass
    if bound is not None:
        choose_reference_pass(plan, bound)
    if force or store.get(plan.build.key) is None:
        plan.runtime.check_available(recipe.data)
    ran: list[StepRecord] = []
    with store.applying():  # gc refuses while any worker builds
        entry, evaluation = run_steps(plan, store, ran, quiet, force)
    return Done(ran, entry.key, evaluation, time.perf_counter() - started)


def portable(error: EngineError) -> EngineError:
    """The error itself when it survives pickling (to cross to the driver), else a plain copy."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - an exception class with an unusual __init__
        copy = EngineError(error.message, error.hint)
        copy.exit_code = error.exit_code
        return copy


def estimate_of(plan: Plan) -> int | None:
    """The largest memory estimate of the variant's missing steps (issue 12 sets them on StepPlan)."""
    sizes = [getattr(step, "memory_estimate", None) for step in plan.steps if not step.hit]
    sizes = [s for s in sizes if s]
    return max(sizes) if sizes else None


class Executor:
    """The driver of a parallel sweep; subclasses say how tasks run (`run`)."""

    retries: int = 1

    def run(self, tasks: list[Task], locations: Locations, force: bool,
            started: Callable[[Task, str], None]) -> Iterator[tuple[Task, Done | EngineError]]:
        """Yield each task's result (or its error) as it finishes."""
        raise NotImplementedError

    def apply(self, recipes: list[Recipe], locations: Locations, *, skipped: list[Skipped], force: bool,
              progress: Callable[[str], Progress], on_outcome: Callable[[Outcome], None],
              max_memory: int | None = None, force_memory: bool = False) -> SweepResult:
        """What pipeline.apply_recipes does serially, with the missing steps run by `run`; a variant
        with a step that cannot fit (engine.admission) is refused before any work, as serially."""
        self.max_memory = max_memory
        locations = Locations(locations.registry.absolute(), locations.store.absolute())
        store = Store(locations.store)
        outcomes: dict[int, Outcome] = {}

        def finish(index: int, outcome: Outcome) -> None:
            outcomes[index] = outcome
            on_outcome(outcome)

        plans: dict[int, Plan] = {}
        for index, recipe in enumerate(recipes):
            try:
                with using_locations(locations):
                    plan = make_plan(recipe, store)
                if not force and all(step.hit for step in plan.steps):  # cached: registered here, at once
                    finish(index, Outcome(recipe.name, apply_recipe(recipe, locations, progress=progress(recipe.name),
                                                                    max_memory=max_memory, force_memory=force_memory)))
                    continue
                check_fits(plan, max_memory, force=force_memory)
                plan.runtime.check_available(recipe.data)
                plans[index] = plan
            except EngineError as error:
                finish(index, Outcome(recipe.name, error=error))
        if plans:
            first = next(iter(plans.values()))
            with _applying(first, store, locations, force):
                self._run_missing(plans, recipes, store, locations, force, progress, finish)
        return SweepResult([outcomes[i] for i in sorted(outcomes)], list(skipped))

    def _run_missing(self, plans: dict[int, Plan], recipes: list[Recipe], store: Store, locations: Locations,
                     force: bool, progress: Callable[[str], Progress], finish: Callable[[int, Outcome], None]) -> None:
        # each shared source made once, here, before any worker starts (the workers then find it cached)
        sources: dict[str, list[StepRecord] | EngineError] = {}
        first_of: dict[int, list[StepRecord]] = {}
        for index, plan in plans.items():
            key = plan.steps[0].key
            if key in sources or plan.steps[0].hit:
                continue
            made: list[StepRecord] = []
            try:
                _materialize(plan, store, made, progress(plan.recipe.name))
                sources[key] = made
                first_of[index] = made  # the first variant records that it made the source
            except EngineError as error:
                sources[key] = error
        tasks = []
        for index, plan in plans.items():
            failed = sources.get(plan.steps[0].key)
            if isinstance(failed, EngineError):
                finish(index, Outcome(plan.recipe.name, error=failed))
                continue
            device = plan.recipe.data["target"].get("device", "cpu")
            tasks.append(Task(index, recipes[index], estimate_of(plan), gpus=0 if device == "cpu" else 1,
                              max_memory=getattr(self, "max_memory", None)))

        def started(task: Task, what: str) -> None:
            progress(task.name)(what, False)

        with contextlib.closing(self.run(tasks, locations, force, started)) as results:  # closed: workers stopped
            self._register_each(results, plans, first_of, store, locations, finish)

    @staticmethod
    def _register_each(results: Iterator[tuple[Task, Done | EngineError]], plans: dict[int, Plan],
                       first_of: dict[int, list[StepRecord]], store: Store, locations: Locations,
                       finish: Callable[[int, Outcome], None]) -> None:
        """Register each variant as its worker reports (one transaction each), checking its keys."""
        for task, result in results:
            plan = plans[task.index]
            if isinstance(result, EngineError):
                finish(task.index, Outcome(task.name, error=result))
                continue
            try:
                if result.build_key != plan.build.key:
                    raise KeyMismatch(f"{task.name}: the worker built {result.build_key[:16]}… but this machine "
                                      f"planned {plan.build.key[:16]}…; nothing was registered",
                                      hint="install the same engine and backend versions on every node")
                entry = store.get(result.build_key)
                if entry is None:
                    raise WorkerLost(f"{task.name}: the worker reported {result.build_key[:16]}… but the store "
                                     f"{store.root} does not have it; nothing was registered",
                                     hint="every node must see the store at the same path (a shared filesystem)")
                ran = result.ran + first_of.get(task.index, [])  # later records win in _register
                variant, created = _register(plan, store, entry, ran, result.evaluation, locations)
                finish(task.index, Outcome(task.name, ApplyResult(plan, variant, created, ran, result.seconds)))
            except EngineError as error:
                finish(task.index, Outcome(task.name, error=error))


def make_executor(jobs: int, executor: str = "local", address: str | None = None,
                  retries: int = 1) -> Executor | None:
    """The executor `engine apply` options ask for; None for the serial apply (one job, local)."""
    if executor == "ray":
        try:
            from .ray_executor import RayExecutor
        except ImportError as error:
            if (error.name or "").split(".")[0] != "ray":
                raise
            raise EngineError("`--executor ray` needs Ray, which is not installed in this environment",
                              hint="pip install 'engine[ray]' (the same on every node of the cluster)") from None
        return RayExecutor(address, retries)
    if address is not None:
        raise EngineError("--address names a Ray cluster; it needs --executor ray",
                          hint="engine apply SWEEP.yaml --executor ray --address HOST:6379")
    if jobs <= 1:
        return None
    from .local_executor import LocalExecutor

    return LocalExecutor(jobs, retries)
