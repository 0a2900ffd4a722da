"""Plan a recipe: its source, build and evaluation steps, each keyed by what determines it.

A step's key is the sha256 of canonical JSON of its kind, its parameters (defaults filled), its
input's key, the versions of the libraries that change its output, and the step's own version.
Planning imports no runtime library and downloads nothing, so a fully cached apply stays instant;
`make_plan` is pure apart from reading the store and the stat cache, and testable in-process.
"""
from __future__ import annotations

from dataclasses import dataclass

from .admission import estimate_plan
from .discovery import get_runtime
from .errors import EngineError, RecipeInvalid
from .evaluation import eval_key, eval_spec, method, reference_key
from .hashing import content_key
from .preflight import check_eval_fits, path_too_long
from .quantized_sources import source_issues
from .recipe import Recipe
from .runtime import Runtime
from .sources import Source, source_from_recipe
from .steps import StepPlan
from .store import Store
from .tasks import key_part
from .versions import VersionLookup, installed_version, optional_versions, versions_of

SOURCE_STEP_VERSION = 1
#: what the source reference pass (PyTorch) depends on when the runtime does not list them itself
REFERENCE_LIBRARIES = ("torch", "transformers")


def source_key(identity: dict) -> str:
    """The key of a source step: what names its exact bytes."""
    return content_key({"step": "source", "v": SOURCE_STEP_VERSION, "identity": identity})


@dataclass
class Plan:
    recipe: Recipe
    runtime: Runtime
    source_type: Source
    source: dict  # kind, key, identity, description: what the registry records
    steps: list[StepPlan]
    spec: dict | None = None  # the normalized eval spec, when the recipe has one
    #: what the reference pass scores (the source itself, or `eval.reference`), and its source step
    reference_source: Source | None = None
    reference_step: StepPlan | None = None

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
        if source.kind == "variant" and isinstance(error, EngineError):  # an unknown name: located in the file
            raise RecipeInvalid([recipe.issue(("source", "variant"), error.message, error.hint)]) from None
        raise (path_too_long(recipe, error) or error) from error
    src_key = source.store_key(identity) or source_key(identity)
    described = source.describe()
    record = {"kind": source.kind, "key": src_key, "identity": identity, "description": described}
    prequantized = source_issues(recipe, runtime, source)  # a cycle, a quantized source, re-quantizing
    if prequantized:
        raise RecipeInvalid(prequantized)
    if source.format not in runtime.source_formats:
        raise RecipeInvalid([recipe.issue(("source",), f"runtime '{runtime.name}' cannot build from a {source.format} "
                                          "file", "a ready-made .gguf registers with `target.runtime: llama.cpp`; "
                                          "other runtimes build from a Hugging Face checkpoint")])
    issues = runtime.recipe_issues(recipe, source)
    if issues:
        raise RecipeInvalid(sorted(issues, key=lambda i: (i.line, i.col, i.path)))
    params = runtime.build_params(data, base_dir, source)
    library = versions_of(runtime.distributions, versions, needed_by=f"runtime '{runtime.name}'",
                          extra=runtime.extra)
    # params named "_..." are build inputs whose content the key already holds (e.g. a file path
    # next to its content hash): they reach the runtime but not the key
    key_params = {k: v for k, v in params.items() if not k.startswith("_")}
    build_doc = {
        "step": "build", "runtime": runtime.name, "v": runtime.step_version,
        "params": key_params, "input": src_key, "versions": library, **key_part(data),
    }
    if runtime.build_env is not None:  # the pins of its own environment (engine.buildenv)
        build_doc["build_env"] = runtime.build_env.lock()
    build_key = content_key(build_doc)
    steps = [
        StepPlan("source", src_key, described, identity.get("versions", {}),
                 source.status(store.get(src_key) is not None), source.detail(identity)),
        StepPlan("build", build_key, key_params, library, "cached" if store.get(build_key) else "missing",
                 f"{runtime.name} {params.get('precision') or ''}".strip(), inputs=params),
    ]
    spec = eval_spec(data, base_dir, stat_cache.hash)
    check_eval_fits(recipe, source, spec)
    ref_source = ref_step = None
    if spec:
        ref_source, ref_step = _reference(recipe, source, steps[0], stat_cache, store, versions)
        if "perplexity" in spec and ref_source is None:  # no unquantized model: the variant's own tokens
            if (data["eval"].get("fidelity") and ("eval", "fidelity") in recipe.positions):
                raise RecipeInvalid([recipe.issue(("eval", "fidelity"), "KL and top-1 need an unquantized reference",
                                                  "add eval.reference: {path: <HF folder>} or {model: ..., revision: ...}")])
            spec["perplexity"] = {**spec["perplexity"], "fidelity": False, "tokens": "variant tokenizer"}
        steps += _eval_steps(spec, ref_step.key if ref_step else None, build_key, library, store, versions)
    plan = Plan(recipe, runtime, source, record, steps, spec, ref_source, ref_step)
    estimate_plan(plan)  # memory each step will need (engine.memory): before any work
    return plan


def _reference(recipe: Recipe, source: Source, source_step: StepPlan, stat_cache, store: Store,
               versions: VersionLookup) -> tuple[Source | None, StepPlan | None]:
    """The unquantized model evaluation compares against: `eval.reference` when given, else the
    source when it is a Hugging Face checkpoint, else none (a ready-made GGUF alone)."""
    given = recipe.data["eval"].get("reference")
    if not given:
        return (source, source_step) if source.format == "hf" else (None, None)
    reference = source_from_recipe(given, recipe.base_dir())
    if reference.format != "hf":
        raise RecipeInvalid([recipe.issue(("eval", "reference"), "the reference must be an unquantized Hugging "
                                          "Face checkpoint", "give a folder ({path: ...}) or {model: ..., revision: ...}")])
    identity = reference.identity(stat_cache, versions)
    key = source_key(identity)
    return reference, StepPlan("source", key, reference.describe(), identity.get("versions", {}),
                               reference.status(store.get(key) is not None), reference.detail(identity))


def _eval_steps(spec: dict, reference_source: str | None, build_key: str, library: dict, store: Store,
                versions: VersionLookup) -> list[StepPlan]:
    steps = []
    ref_key = None
    if "perplexity" in spec and reference_source is not None:
        ref_versions = ({d: library[d] for d in REFERENCE_LIBRARIES if d in library}
                        or optional_versions(REFERENCE_LIBRARIES, versions))
        ref_key = reference_key(reference_source, spec, ref_versions)
        steps.append(StepPlan("reference", ref_key, method(spec["perplexity"]), ref_versions,
                              "cached" if store.get(ref_key) else "missing", "source model scores (PyTorch fp32)"))
    key = eval_key(build_key, ref_key, spec, library)
    steps.append(StepPlan("eval", key, {k: method(v) for k, v in spec.items()}, library,
                          "cached" if store.get(key) else "missing", ", ".join(spec)))
    return steps
