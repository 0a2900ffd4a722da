"""Plan and run a recipe: source -> build -> register, each step keyed by what determines it.

A step's key is the sha256 of canonical JSON of its kind, its parameters (defaults filled), its
input's key, the versions of the libraries that change its output, and the engine's own step
version. A key found in the store is reused; the registry row is written last. Computing the keys
never imports a runtime library, so a fully cached apply stays fast.
"""
from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__
from .errors import EngineError
from .evaluation import compute_reference, eval_key, eval_spec, evaluate_variant, method, reference_key
from .hashing import content_key
from .paths import Locations, resolve
from .recipe import Recipe, load_recipe
from .registry import Registry, StepRecord
from .runtimes import Runtime, get_runtime, installed_version, library_versions
from .sources import materialize_source, source_identity
from .store import Store

SOURCE_STEP_VERSION = 1

#: progress(message, detail): detail=True for a tool's own output lines (shown only live)
Progress = Callable[[str, bool], None]


def _quiet(message: str, detail: bool = False) -> None:
    pass


@dataclass
class StepPlan:
    kind: str  # "source" | "build"
    key: str
    params: dict
    versions: dict
    status: str  # "cached" | "missing" | "local" | "hub"
    detail: str = ""
    inputs: dict = field(default_factory=dict)  # what the runtime gets: params plus "_..." inputs

    @property
    def hit(self) -> bool:
        return self.status in ("cached", "local")


@dataclass
class Plan:
    recipe: Recipe
    runtime: Runtime
    source: dict  # kind, key, identity, description
    steps: list[StepPlan]

    spec: dict | None = None  # the normalized eval spec, when the recipe has one

    def step(self, kind: str) -> StepPlan | None:
        return next((s for s in self.steps if s.kind == kind), None)

    @property
    def build(self) -> StepPlan:
        return self.step("build")


@dataclass
class ApplyResult:
    plan: Plan
    variant: dict | None  # None for a dry run
    created: bool = False  # a new version was registered
    ran: list[StepRecord] = field(default_factory=list)  # steps executed (not reused)
    seconds: float = 0.0

    @property
    def rebuilt_nothing(self) -> bool:
        return not self.ran


def make_plan(recipe: Recipe, store: Store) -> Plan:
    runtime = get_runtime(recipe.runtime)
    data = recipe.data
    stat_cache = store.stat_cache()  # one connection for the source digest and the eval data hash
    identity = source_identity(data["source"], recipe.base_dir(), stat_cache)
    kind = next(k for k in ("model", "path", "synthetic") if k in data["source"])
    kind = {"model": "hub"}.get(kind, kind)
    source_key = content_key({"step": "source", "v": SOURCE_STEP_VERSION, "identity": identity})
    source = {"kind": kind, "key": source_key, "identity": identity,
              "description": _describe_source(data["source"], recipe.base_dir())}
    src_status = {"hub": "hub", "path": "local"}.get(kind) or (
        "cached" if store.get(source_key) else "missing")
    params = runtime.build_params(data, recipe.base_dir())
    versions = library_versions(runtime)
    # params named "_..." are build inputs whose content the key already holds (e.g. a file path
    # next to its content hash): they reach the runtime but not the key
    key_params = {k: v for k, v in params.items() if not k.startswith("_")}
    build_key = content_key({
        "step": "build", "runtime": runtime.name, "v": runtime.step_version,
        "params": key_params, "input": source_key, "versions": versions,
    })
    steps = [
        StepPlan("source", source_key, source["description"], identity.get("versions", {}), src_status,
                 _source_detail(source)),
        StepPlan("build", build_key, key_params, versions, "cached" if store.get(build_key) else "missing",
                 f"{runtime.name} {params.get('precision') or ''}".strip(), inputs=params),
    ]
    spec = eval_spec(data, recipe.base_dir(), stat_cache.hash)
    if spec:
        steps += _eval_steps(spec, source_key, build_key, versions, store)
    return Plan(recipe, runtime, source, steps, spec)


def _eval_steps(spec: dict, source_key: str, build_key: str, versions: dict, store: Store) -> list[StepPlan]:
    steps = []
    ref_key = None
    if "perplexity" in spec:
        ref_versions = {d: versions[d] for d in ("torch", "transformers") if d in versions} or _torch_versions()
        ref_key = reference_key(source_key, spec, ref_versions)
        steps.append(StepPlan("reference", ref_key, method(spec["perplexity"]), ref_versions,
                              "cached" if store.get(ref_key) else "missing", "source model scores (PyTorch fp32)"))
    key = eval_key(build_key, ref_key, spec, versions)
    steps.append(StepPlan("eval", key, {k: method(v) for k, v in spec.items()}, versions,
                          "cached" if store.get(key) else "missing", ", ".join(spec)))
    return steps


def _torch_versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("torch", "transformers"):
        try:
            out[dist] = installed_version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def apply(recipe: Recipe | str | Path, locations: Locations | None = None, *, force: bool = False,
          dry_run: bool = False, progress: Progress = _quiet, registry: str | Path | None = None,
          store: str | Path | None = None) -> ApplyResult:
    """Apply one recipe (a path or a loaded Recipe); registry/store default as in engine.paths."""
    started = time.perf_counter()
    locations = locations or resolve(registry, store)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    store = Store(locations.store)
    plan = make_plan(recipe, store)
    if dry_run:
        if force:
            plan.build.status = "missing"
        return ApplyResult(plan, None, seconds=time.perf_counter() - started)
    ran: list[StepRecord] = []
    entry = None if force else store.get(plan.build.key)
    if entry is None:
        plan.runtime.check_available(recipe.data)
        with store.lock(plan.build.key):
            entry = None if force else store.get(plan.build.key)  # built meanwhile by another apply?
            if entry is None:
                entry = _build(plan, store, ran, progress)
    evaluation = _evaluate(plan, store, entry, ran, progress, force) if plan.spec else None
    registry = Registry(locations.registry)
    try:
        artifact = {"key": entry.key, "kind": "build", "runtime": plan.runtime.name,
                    "created": entry.manifest["created"], "size_bytes": entry.size,
                    "meta": entry.manifest.get("meta", {})}
        done = {s.kind: s for s in ran}
        steps = [done.get(s.kind) or StepRecord(s.kind, s.key, True, 0.0, s.params, s.versions) for s in plan.steps]
        variant, created = registry.register(
            recipe=recipe, recipe_json=recipe.data, source=plan.source, artifact=artifact,
            files=entry.manifest["files"], steps=steps, engine_version=__version__,
            rebuilt=any(s.kind == "build" for s in ran), evaluation=evaluation,
        )
    finally:
        registry.close()
    return ApplyResult(plan, variant, created, ran, time.perf_counter() - started)


def _build(plan: Plan, store: Store, ran: list[StepRecord], progress: Progress):
    recipe, source_step, build_step = plan.recipe, plan.steps[0], plan.steps[1]
    t0 = time.perf_counter()
    progress(f"resolving source: {source_step.detail}", False)
    source_dir = _materialize(plan, store, progress)
    ran.append(StepRecord("source", source_step.key, source_step.status in ("cached", "local"),
                          time.perf_counter() - t0, source_step.params, source_step.versions))
    t1 = time.perf_counter()
    progress(f"building {build_step.detail}", False)
    with store.staging(build_step.key) as stage:
        try:
            meta = plan.runtime.build(source_dir, stage.files_dir, build_step.inputs, stage.logs_dir,
                                      lambda line: progress(line, True))
        except EngineError as error:
            logs = f"full log: {_keep_failed_logs(store, stage.logs_dir, build_step.key)}"
            error.hint = f"{error.hint}; {logs}" if error.hint else logs
            raise
        entry = store.commit(stage, "build", {"runtime": plan.runtime.name, "recipe": recipe.name, **meta})
    ran.append(StepRecord("build", build_step.key, False, time.perf_counter() - t1,
                          build_step.params, build_step.versions))
    return entry


def _evaluate(plan: Plan, store: Store, artifact, ran: list[StepRecord], progress: Progress,
              force: bool) -> dict:
    """Run the reference and eval steps that are missing; returns what the registry records."""
    ref_step, eval_step = plan.step("reference"), plan.step("eval")
    ref_entry = None
    if ref_step:
        ref_entry = _cached_step(store, ref_step, ran, progress, force=False, run=lambda out: compute_reference(
            _materialize(plan, store, progress), plan.spec, out, lambda m: progress(m, True)))
    info = {"name": plan.recipe.name, "version": 0, "runtime": plan.runtime.name,
            "artifact_dir": str(artifact.files_dir)}

    def run(out: Path) -> dict:
        scores = evaluate_variant(lambda: plan.runtime.load(artifact.files_dir, info), artifact.size, plan.spec,
                                  ref_entry.files_dir if ref_entry else None, lambda m: progress(m, True))
        (out / "scores.json").write_text(json.dumps(scores, indent=1, sort_keys=True))
        return {}

    eval_entry = _cached_step(store, eval_step, ran, progress, force=force, run=run)
    scores = json.loads((eval_entry.files_dir / "scores.json").read_text())
    return {"key": eval_step.key, "scores": scores, "versions": eval_step.versions}


def _cached_step(store: Store, step: StepPlan, ran: list[StepRecord], progress: Progress, *, force: bool, run):
    """Reuse the store entry for step.key, or run `run(out_dir)` in staging and commit it."""
    entry = None if force else store.get(step.key)
    if entry is not None:
        return entry
    with store.lock(step.key):
        entry = None if force else store.get(step.key)
        if entry is None:
            started = time.perf_counter()
            progress(f"{step.kind}: {step.detail}", False)
            with store.staging(step.key) as stage:
                meta = run(stage.files_dir) or {}
                entry = store.commit(stage, step.kind, meta)
            ran.append(StepRecord(step.kind, step.key, False, time.perf_counter() - started, step.params,
                                  step.versions))
    return entry


def _materialize(plan: Plan, store: Store, progress: Progress) -> Path:
    """A local folder with the source model; synthetic sources are cached in the store."""
    source = plan.recipe.data["source"]
    if "synthetic" not in source:
        folder, _ = materialize_source(
            source, plan.recipe.base_dir(), store.root / "tmp",
            allow_patterns=list(plan.runtime.source_patterns), cache_dir=None,
            stat_cache=store.stat_cache(),
        )
        return folder
    key = plan.source["key"]
    with store.lock(key):
        entry = store.get(key)
        if entry is None:
            from .synthetic import make_synthetic_model

            progress("making the synthetic source model", False)
            with store.staging(key) as stage:
                make_synthetic_model(source["synthetic"], stage.files_dir)
                entry = store.commit(stage, "source", {"synthetic": source["synthetic"]})
    return entry.files_dir


def _keep_failed_logs(store: Store, logs_dir: Path, key: str) -> Path:
    target = store.root / "failed" / f"{key}.{time.strftime('%Y%m%dT%H%M%S')}"
    shutil.copytree(logs_dir, target, dirs_exist_ok=True)
    return target


def _describe_source(source: dict, base_dir: Path) -> dict:
    if "model" in source:
        return {"repo": source["model"], "revision": source["revision"]}
    if "path" in source:
        return {"path": str((base_dir / source["path"]).resolve())}
    return {"synthetic": source["synthetic"]}


def _source_detail(source: dict) -> str:
    desc = source["description"]
    if source["kind"] == "hub":
        return f"{desc['repo']}@{source['identity'].get('commit', desc['revision'])[:12]}"
    if source["kind"] == "path":
        return desc["path"]
    return f"synthetic {desc['synthetic'].get('architecture')} seed={desc['synthetic'].get('seed')}"
