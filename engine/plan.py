"""Plan a recipe: its source, build and evaluation steps, each keyed by what determines it.

A step's key is the sha256 of canonical JSON of its kind, its parameters (defaults filled), its
input's key, the versions of the libraries that change its output, and the step's own version.
Planning imports no runtime library and downloads nothing, so a fully cached apply stays instant;
`make_plan` is pure apart from reading the store and the stat cache, and testable in-process.
"""
from __future__ import annotations

from dataclasses import dataclass

from .discovery import get_runtime
from .evaluation import eval_key, eval_spec, method, reference_key
from .hashing import content_key
from .preflight import check_eval_fits, path_too_long
from .recipe import Recipe
from .runtime import Runtime
from .sources import Source, source_from_recipe
from .steps import StepPlan
from .store import Store
from .versions import VersionLookup, installed_version, optional_versions, versions_of

SOURCE_STEP_VERSION = 1
#: what the source reference pass (PyTorch) depends on when the runtime does not list them itself
REFERENCE_LIBRARIES = ("torch", "transformers")


@dataclass
class Plan:
    recipe: Recipe
    runtime: Runtime
    source_type: Source
    source: dict  # kind, key, identity, description: what the registry records
    steps: list[StepPlan]
    spec: dict | None = None  # the normalized eval spec, when the recipe has one

    def step(self, kind: str) -> StepPlan | None:
        return next((s for s in self.steps if s.kind == kind), None)

    @property
    def build(self) -> StepPlan:
        step = self.step("build")
        assert step is not None
        return step


def make_plan(recipe: Recipe, store: Store, *, versions: VersionLookup = installed_version) -> Plan:
    """The recipe's steps with their keys and cached/missing status. `versions` looks up a
    distribution's version (tests pass a fixed table to pin keys)."""
    runtime = get_runtime(recipe.runtime)
    data, base_dir = recipe.data, recipe.base_dir()
    stat_cache = store.stat_cache()  # one connection for the source digest and the eval data hash
    source = source_from_recipe(data["source"], base_dir)
    try:
        identity = source.identity(stat_cache, versions)
    except OSError as error:
        raise (path_too_long(recipe, error) or error) from error
    source_key = content_key({"step": "source", "v": SOURCE_STEP_VERSION, "identity": identity})
    described = source.describe()
    record = {"kind": source.kind, "key": source_key, "identity": identity, "description": described}
    params = runtime.build_params(data, base_dir, source)
    library = versions_of(runtime.distributions, versions, needed_by=f"runtime '{runtime.name}'",
                          extra=runtime.extra)
    # params named "_..." are build inputs whose content the key already holds (e.g. a file path
    # next to its content hash): they reach the runtime but not the key
    key_params = {k: v for k, v in params.items() if not k.startswith("_")}
    build_key = content_key({
        "step": "build", "runtime": runtime.name, "v": runtime.step_version,
        "params": key_params, "input": source_key, "versions": library,
    })
    steps = [
        StepPlan("source", source_key, described, identity.get("versions", {}),
                 source.status(store.get(source_key) is not None), source.detail(identity)),
        StepPlan("build", build_key, key_params, library, "cached" if store.get(build_key) else "missing",
                 f"{runtime.name} {params.get('precision') or ''}".strip(), inputs=params),
    ]
    spec = eval_spec(data, base_dir, stat_cache.hash)
    check_eval_fits(recipe, source, spec)
    if spec:
        steps += _eval_steps(spec, source_key, build_key, library, store, versions)
    return Plan(recipe, runtime, source, record, steps, spec)


def _eval_steps(spec: dict, source_key: str, build_key: str, library: dict, store: Store,
                versions: VersionLookup) -> list[StepPlan]:
    steps = []
    ref_key = None
    if "perplexity" in spec:
        ref_versions = ({d: library[d] for d in REFERENCE_LIBRARIES if d in library}
                        or optional_versions(REFERENCE_LIBRARIES, versions))
        ref_key = reference_key(source_key, spec, ref_versions)
        steps.append(StepPlan("reference", ref_key, method(spec["perplexity"]), ref_versions,
                              "cached" if store.get(ref_key) else "missing", "source model scores (PyTorch fp32)"))
    key = eval_key(build_key, ref_key, spec, library)
    steps.append(StepPlan("eval", key, {k: method(v) for k, v in spec.items()}, library,
                          "cached" if store.get(key) else "missing", ", ".join(spec)))
    return steps
