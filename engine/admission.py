"""Put memory estimates on a plan's steps, and refuse a step that cannot fit before any work starts.

`estimate_plan` fills StepPlan.memory_estimate (bytes the step must own at its peak) from
engine.memory's formulas and the runtime's declared behaviour; `check_fits` compares the steps
that will run with what the machine has free (MemAvailable) or `--max-memory`, and names the
options that would fit. Nothing here imports a heavy library.
"""
from __future__ import annotations

from typing import Any

from . import memory
from .errors import EngineError
from .memory import Estimate, ModelFacts, gb


class MemoryRefused(EngineError, MemoryError):
    """A step's estimated peak is more than the memory it may use."""


def estimate_plan(plan: Any) -> None:
    """Set memory_estimate / memory_note on every step of `plan` (None where the facts are unknown)."""
    facts = memory.source_facts(plan.source_type) if plan.source_type.format == "hf" else None
    ppl = (plan.spec or {}).get("perplexity") or {}
    window = int(ppl.get("window") or 0)
    for step in plan.steps:
        _set(step, _step_estimate(plan, step, facts, window, ppl))
    choose_reference_pass(plan, memory.available_memory())


def _set(step: Any, estimate: Estimate | None) -> None:
    if estimate is not None:
        step.memory_estimate = estimate.anonymous
        step.memory_note = f"{estimate.note}; peak RSS ~{gb(estimate.peak_rss)}".lstrip("; ")


def choose_reference_pass(plan: Any, bound: int | None) -> None:
    """The reference pass holds the model whole in fp32 unless that would not fit under `bound` and
    the layer-by-layer pass (engine.streamed, same scores, same key) does; ENGINE_REFERENCE_PASS=
    streamed|whole decides instead. Sets step.inputs["streamed"] and the step's estimate."""
    import os

    from .streamed import supports

    step = plan.step("reference")
    source = plan.reference_source
    if step is None or source is None:
        return
    config = source.config()
    facts = memory.source_facts(source)
    wanted = os.environ.get("ENGINE_REFERENCE_PASS", "auto")
    if not facts or not supports(config) or wanted == "whole":
        return
    ppl = plan.spec["perplexity"]
    streamed = memory.reference_streamed(facts, int(ppl["window"]), int(ppl["max_windows"]))
    whole = memory.reference_whole(facts, int(ppl["window"]))
    if wanted == "streamed" or (bound is not None and whole.anonymous > bound):
        step.inputs["streamed"] = True
        step.detail = "source model scores (PyTorch fp32, layer by layer)"
        _set(step, streamed)
    else:
        step.inputs.pop("streamed", None)
        step.detail = "source model scores (PyTorch fp32)"
        _set(step, whole)


def _step_estimate(plan: Any, step: Any, facts: ModelFacts | None, window: int, ppl: dict) -> Estimate | None:
    if step.kind == "source":
        return memory.source_step(facts)
    if step.kind == "build":
        return plan.runtime.build_memory(facts, step.inputs) if facts else None
    if step.kind == "reference":
        ref = plan.reference_source
        ref_facts = facts if ref is plan.source_type else (memory.source_facts(ref) if ref else None)
        return reference_estimate(ref_facts, window, int(ppl.get("max_windows") or 1)) if ref_facts else None
    if step.kind == "eval":
        return plan.runtime.eval_memory(facts, plan.build.inputs, window) if facts else None
    return None


def reference_estimate(facts: ModelFacts, window: int, windows: int) -> Estimate:
    """The source reference pass, whole-model in fp32 (the recorded method)."""
    return memory.reference_whole(facts, window)


def memory_bound(limit: int | None = None) -> int | None:
    """The memory a step may use here: the smaller of `limit` (--max-memory) and MemAvailable."""
    available = memory.available_memory()
    return min(x for x in (limit, available) if x is not None) if (limit or available) else None


def check_fits(plan: Any, limit: int | None = None, *, force: bool = False) -> None:
    """Refuse (MemoryRefused) when a step that will run needs more than `limit` bytes, or than
    MemAvailable when no limit is given. `force` skips the check."""
    if force:
        return
    bound = memory_bound(limit)
    if bound is None:
        return
    choose_reference_pass(plan, bound)
    over = [s for s in plan.steps if not s.hit and s.memory_estimate and s.memory_estimate > bound]
    if not over:
        return
    what = "--max-memory" if limit is not None and bound == limit else "free memory"
    lines = "; ".join(f"{s.kind} needs ~{gb(s.memory_estimate)} ({s.memory_note})" for s in over)
    raise MemoryRefused(f"{plan.recipe.name}: {lines}, more than the {gb(bound)} of {what}; nothing was started",
                        hint=_options(plan, over, bound))


def _options(plan: Any, over: list, bound: int) -> str:
    """What would fit: other runtimes whose build fits, a larger limit, or forcing it."""
    options = []
    if any(s.kind == "build" for s in over):
        facts = memory.source_facts(plan.source_type)
        fits = _runtimes_that_fit(plan, facts, bound) if facts else []
        if fits:
            options.append("a runtime whose build fits: " + ", ".join(fits))
    needed = max(s.memory_estimate for s in over)
    options.append(f"free memory (or run on a machine with {gb(needed)} available)")
    options.append("--force-memory to run it anyway (the kernel may kill the step)")
    return "; ".join(options)


def _runtimes_that_fit(plan: Any, facts: ModelFacts, bound: int) -> list[str]:
    from .discovery import get_runtime, runtime_names

    found = []
    for name in runtime_names():
        if name == plan.runtime.name:
            continue
        try:
            estimate = get_runtime(name).build_memory(facts, {})
        except Exception:  # noqa: BLE001 - a plugin's formula failing must not hide the refusal itself
            continue
        if estimate is not None and estimate.anonymous <= bound:
            found.append(f"{name} (~{gb(estimate.anonymous)})")
    return found
