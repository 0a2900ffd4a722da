"""Apply recipes: plan, run the missing steps, register. Sweeps included.

The registry row is written last, in one transaction, so a crash at any point leaves nothing
registered; every step goes through engine.steps.run_step. `apply` takes one recipe file (a sweep
gives one result per variant, plus the combinations skipped and why); the CLI only renders.
"""
from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .admission import check_fits, choose_reference_pass
from .errors import ArtifactVanished, BuildFailed, EngineError, SourceChanged, store_error
from .evaluation import compute_reference, evaluate_variant
from .paths import Locations, resolve
from .plan import Plan, make_plan, source_key
from .precision import summarize
from .recipe import Recipe, load_recipes
from .recipe.matrix import Skipped
from .records import StepRecord, VariantRecord
from .registry import Registry
from .sources import Materialize, Source
from .steps import Progress, quiet, run_step
from .store import Entry, Store
from .tasks import task_of
from .variant_source import using_locations

__all__ = ["ApplyResult", "Outcome", "SweepResult", "apply", "apply_recipe", "apply_recipes"]


@dataclass
class ApplyResult:
    plan: Plan
    variant: VariantRecord | None  # None for a dry run
    created: bool = False  # a new version was registered
    ran: list[StepRecord] = field(default_factory=list)  # steps executed (not reused)
    seconds: float = 0.0

    @property
    def rebuilt_nothing(self) -> bool:
        return not self.ran


@dataclass
class Outcome:
    """One variant of a sweep: its result, or the error that stopped it (the others still ran)."""

    name: str
    result: ApplyResult | None = None
    error: EngineError | None = None


@dataclass
class SweepResult:
    outcomes: list[Outcome]
    skipped: list[Skipped]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.error is not None]

    @property
    def results(self) -> list[ApplyResult]:
        return [o.result for o in self.outcomes if o.result is not None]


def apply(recipe: Recipe | str | Path, locations: Locations | None = None, *, force: bool = False,
          dry_run: bool = False, progress: Progress = quiet, registry: str | Path | None = None,
          store: str | Path | None = None, executor=None) -> ApplyResult | SweepResult:
    """Apply a recipe file (or a loaded Recipe). A sweep (a file with `matrix:`) gives a SweepResult:
    every valid combination applied, one failure not stopping the others; in parallel with an
    `executor` (engine.executors.make_executor(2), or make_executor(1, "ray", address))."""
    locations = locations or resolve(registry, store)
    if isinstance(recipe, Recipe):
        return apply_recipe(recipe, locations, force=force, dry_run=dry_run, progress=progress)
    recipes, skipped = load_recipes(recipe)
    if len(recipes) == 1 and recipes[0].matrix is None:
        return apply_recipe(recipes[0], locations, force=force, dry_run=dry_run, progress=progress)
    return apply_recipes(recipes, locations, skipped=skipped, force=force, dry_run=dry_run,
                         progress=lambda name: progress, executor=executor)


def apply_recipes(recipes: Iterable[Recipe], locations: Locations | None = None, *, skipped: list[Skipped] = (),
                  force: bool = False, dry_run: bool = False,
                  progress: Callable[[str], Progress] = lambda name: quiet,
                  on_outcome: Callable[[Outcome], None] = lambda outcome: None, executor=None,
                  max_memory: int | None = None, force_memory: bool = False) -> SweepResult:
    """Apply each recipe in turn; an EngineError in one is recorded and the next one runs.
    `progress(name)` gives the progress callback for one variant; `on_outcome` hears each result.
    An `executor` (engine.executors: local processes or Ray) runs the variants in parallel instead.
    `max_memory` (bytes) bounds each step's estimated peak; `force_memory` skips that check."""
    locations = locations or resolve()
    if executor is not None and not dry_run:  # variants in parallel (engine.executors)
        return executor.apply(list(recipes), locations, skipped=list(skipped), force=force, progress=progress,
                              on_outcome=on_outcome, max_memory=max_memory, force_memory=force_memory)
    outcomes = []
    for recipe in recipes:
        try:
            outcome = Outcome(recipe.name, apply_recipe(recipe, locations, force=force, dry_run=dry_run,
                                                        progress=progress(recipe.name), max_memory=max_memory,
                                                        force_memory=force_memory))
        except EngineError as error:
            outcome = Outcome(recipe.name, error=error)
        outcomes.append(outcome)
        on_outcome(outcome)
    return SweepResult(outcomes, list(skipped))


def apply_recipe(recipe: Recipe, locations: Locations, *, force: bool = False, dry_run: bool = False,
                 progress: Progress = quiet, max_memory: int | None = None,
                 force_memory: bool = False) -> ApplyResult:
    """Plan one variant, run what is missing, register it; a step whose estimated memory does not
    fit is refused before any work (engine.admission)."""
    started = time.perf_counter()
    store = Store(locations.store)
    with using_locations(locations):  # a `source: {variant: ...}` is looked up in this registry and store
        plan = make_plan(recipe, store)
    if dry_run:
        if max_memory is not None:  # the reference pass the bound would choose (engine.admission)
            choose_reference_pass(plan, max_memory)
        if force:
            plan.build.status = "missing"
        return ApplyResult(plan, None, seconds=time.perf_counter() - started)
    ran: list[StepRecord] = []
    check_fits(plan, max_memory, force=force_memory)
    if force or store.get(plan.build.key) is None:
        plan.runtime.check_available(recipe.data)
    with _applying(plan, store, locations, force):
        entry, evaluation = run_steps(plan, store, ran, progress, force)
        variant, created = _register(plan, store, entry, ran, evaluation, locations)
    return ApplyResult(plan, variant, created, ran, time.perf_counter() - started)


def run_steps(plan: Plan, store: Store, ran: list[StepRecord], progress: Progress = quiet,
              force: bool = False) -> tuple[Entry, dict | None]:
    """Every step of one variant short of registering it (the build, then the evaluation when the
    recipe asks for one): what a parallel executor's worker runs, the driver registering after."""
    entry = _build(plan, store, ran, progress, force)
    return entry, (_evaluate(plan, store, entry, ran, progress, force) if plan.spec else None)


@contextlib.contextmanager
def _applying(plan: Plan, store: Store, locations: Locations, force: bool) -> Iterator[None]:
    """Check before any work that the registry takes a write; then hold the store's apply lock
    (gc refuses meanwhile) and list this registry among the store's users. A read-only store is
    fine when nothing needs writing to it (every step cached)."""
    Registry.check_writable_at(locations.registry)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(store.applying())
            store.attach(locations.registry.resolve())
        except OSError as error:
            if force or not all(step.hit for step in plan.steps):
                raise store_error(store.root, error) from error
        yield


def _materialize(plan: Plan, store: Store, ran: list[StepRecord], progress: Progress,
                 source=None, step=None) -> Path:
    """A local folder with the source model (a built source is itself a cached step); `source` and
    `step` name another source (the evaluation's reference)."""
    step = step or plan.steps[0]
    source = source or plan.source_type

    def cached(work: Callable[[Path], dict]) -> Path:
        return run_step(store, step, lambda stage: work(stage.files_dir), ran, progress,
                        message=f"making the source: {step.detail}").files_dir

    ctx = Materialize(store.root / "tmp", list(plan.runtime.source_patterns), store.stat_cache(), cached)
    return source.materialize(ctx)


def _build(plan: Plan, store: Store, ran: list[StepRecord], progress: Progress, force: bool) -> Entry:
    step = plan.build

    def work(stage) -> dict:
        t0 = time.perf_counter()
        progress(f"resolving source: {plan.steps[0].detail}", False)
        before = len(ran)
        source_dir = _materialize(plan, store, ran, progress)
        if len(ran) == before:  # nothing was made: a local folder, a hub snapshot or a cached source
            ran.append(plan.steps[0].record(plan.steps[0].hit, time.perf_counter() - t0))
        inputs = step.inputs
        if plan.runtime.build_env is not None:  # made once under the store, then reused (engine.buildenv)
            from .buildenv import envs_dir

            python = plan.runtime.build_env.ensure(envs_dir(store.root), progress)
            inputs = {**inputs, "_build_python": str(python)}
        progress(f"building {step.detail}", False)
        meta = plan.runtime.build(source_dir, stage.files_dir, inputs, stage.logs_dir,
                                  lambda line: progress(line, True))
        _check_unchanged(plan.source_type, plan.steps[0].key, store)
        progress(f"checking the {plan.runtime.name} artifact runs (one forward pass, one token)", False)
        _prove_it_runs(plan, stage.files_dir, source_dir)
        return {"runtime": plan.runtime.name, "recipe": plan.recipe.name, **meta, **_weights(plan, stage.files_dir)}

    return run_step(store, step, work, ran, progress, force=force, message=f"building {step.detail}")


def _weights(plan: Plan, files_dir: Path) -> dict:
    """{"weights": what each module kind became} read from the artifact; a reader that cannot read
    it says so in the build facts (`engine show`) rather than failing a build that runs."""
    try:
        weights = summarize(plan.runtime.weight_precisions(files_dir))
    except Exception as error:  # noqa: BLE001 - recorded, visible in `engine show`
        return {"weights_unread": f"{type(error).__name__}: {error}"[:300]}
    return {"weights": weights} if weights else {}


def _prove_it_runs(plan: Plan, files_dir: Path, source_dir: Path) -> None:
    """Load the new artifact with its runtime, as engine.load will, and compute one forward pass and
    one generated token: an artifact that cannot run is a failed build, never a registered variant."""
    from .runtime import Model, Sampling

    info = VariantRecord(plan.recipe.name, 0, plan.runtime.name, recipe=plan.recipe.data,
                         artifact_dir=str(files_dir))
    try:
        model = plan.runtime.load(files_dir, info)
        if task_of(plan.recipe.data) == "feature-extraction":  # an embedder: one embedding instead
            model.embed(["The history of"])
            return
        ids = model.encode("The history of") or [0]
        if type(model).logits is not Model.logits and task_of(plan.recipe.data) == "text-generation":
            model.logits(ids)
        next(iter(model.stream_ids(ids, Sampling(max_new_tokens=1))), None)
    except EngineError:
        raise
    except Exception as error:  # the backend's own failure: its words, once, and what to do
        said = " ".join(str(error).split())[:400] or type(error).__name__
        raise BuildFailed(f"{plan.runtime.name} built {plan.recipe.name} but cannot run it: {said}",
                          hint=plan.runtime.run_failure_hint(said, source_dir)) from None


def _evaluate(plan: Plan, store: Store, artifact: Entry, ran: list[StepRecord], progress: Progress,
              force: bool) -> dict:
    """Run the reference and eval steps that are missing; returns what the registry records."""
    ref_step, eval_step = plan.step("reference"), plan.step("eval")
    assert eval_step is not None
    ref_entry = None
    if ref_step:
        def reference(stage) -> dict:
            meta = compute_reference(_materialize(plan, store, ran, progress, plan.reference_source,
                                                  plan.reference_step), plan.spec, stage.files_dir,
                                     lambda m: progress(m, True), streamed=ref_step.inputs.get("streamed", False))
            _check_unchanged(plan.reference_source, plan.reference_step.key, store)
            return meta

        ref_entry = run_step(store, ref_step, reference, ran, progress)
    info = VariantRecord(plan.recipe.name, 0, plan.runtime.name, recipe=plan.recipe.data,
                         artifact_dir=str(artifact.files_dir))

    def work(stage) -> dict:
        scores = evaluate_variant(lambda: plan.runtime.load(artifact.files_dir, info), artifact.size, plan.spec,
                                  ref_entry.files_dir if ref_entry else None, lambda m: progress(m, True),
                                  source_dir=lambda: _materialize(plan, store, ran, progress))
        (stage.files_dir / "scores.json").write_text(json.dumps(scores, indent=1, sort_keys=True))
        return {}

    eval_entry = run_step(store, eval_step, work, ran, progress, force=force)
    scores = json.loads((eval_entry.files_dir / "scores.json").read_text())
    return {"key": eval_step.key, "scores": scores, "versions": eval_step.versions}


def _check_unchanged(source: Source, key: str, store: Store) -> None:
    """A local source folder must hold the bytes its digest named when the step began: otherwise the
    step would be committed under the old key with the new bytes (a poisoned cache). The stat cache
    makes this cheap; a file whose stat moved is hashed again."""
    folder = source.local_folder()
    if folder is None:
        return
    with store.stat_cache() as cache:
        moved = source_key(source.identity(cache)) != key
    if moved:
        raise SourceChanged(f"the source folder {folder} changed while it was being read; nothing was kept",
                            hint="leave the folder alone during `engine apply`, then apply again")


def _check_present(store: Store, *entries: Entry) -> None:
    """The entries about to be registered are still complete in the store (no one deleted them)."""
    for entry in entries:
        if store.get(entry.key) is None or not entry.files_dir.is_dir():
            raise ArtifactVanished(f"the store entry {entry.root} disappeared before it was registered; "
                                   "nothing was registered", hint="apply again (it rebuilds what is missing)")


def _register(plan: Plan, store: Store, entry: Entry, ran: list[StepRecord], evaluation: dict | None,
              locations: Locations) -> tuple[VariantRecord, bool]:
    artifact = {"key": entry.key, "kind": "build", "runtime": plan.runtime.name,
                "created": entry.manifest["created"], "size_bytes": entry.size,
                "meta": entry.manifest.get("meta", {})}
    done = {s.kind: s for s in ran}
    steps = [done.get(s.kind) or s.record(True) for s in plan.steps]
    _check_present(store, entry)
    registry = Registry(locations.registry)
    try:
        return registry.register(
            recipe=plan.recipe, recipe_json=plan.recipe.data, source=plan.source, artifact=artifact,
            files=entry.manifest["files"], steps=steps, engine_version=__version__,
            rebuilt=any(s.kind == "build" for s in ran), evaluation=evaluation,
        )
    finally:
        registry.close()

