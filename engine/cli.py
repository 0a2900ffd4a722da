"""The `engine` command: parse, call the library, render. No logic of its own.

Every EngineError becomes one message (and a hint) on stderr and its own exit code; a traceback is
shown only for a bug in the engine, and only with ENGINE_DEBUG=1.
"""
from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .errors import (
    ENVIRONMENT_ERRNOS,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INVALID_RECIPE,
    EXIT_VERIFY_FAILED,
    EngineError,
    RecipeInvalid,
    VariantNotFound,
)
from .paths import Locations, resolve


def _console(stderr: bool = False):
    """A rich console; piped output gets a wide fixed width so tables never wrap mid-row."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, highlight=False, width=None if stream.isatty() else 200)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="engine")
@click.option("--registry", type=click.Path(dir_okay=False), envvar="ENGINE_REGISTRY",
              help="Registry database. [env ENGINE_REGISTRY; default ./registry.db]")
@click.option("--store", type=click.Path(file_okay=False), envvar="ENGINE_STORE",
              help="Artifact store. [env ENGINE_STORE; default .engine/ beside the registry]")
@click.pass_context
def cli(ctx: click.Context, registry: str | None, store: str | None) -> None:
    """Declarative YAML recipes for LLM quantization, with a model registry."""
    ctx.obj = resolve(registry, store)


@cli.command()
@click.argument("files", nargs=-1, required=True, type=click.Path())
def validate(files: tuple[str, ...]) -> None:
    """Check recipes against the schema (and their runtime's) without running anything."""
    from .recipe import load_recipes

    bad = 0
    for name in files:
        try:
            recipes, skipped = load_recipes(name)
        except RecipeInvalid as error:
            bad += 1
            click.echo(error.message, err=True)
            continue
        for recipe in recipes:
            click.echo(f"{name}: ok ({recipe.name}, runtime {recipe.runtime})")
        _print_skipped(skipped)
    if bad:
        click.echo(f"{bad} of {len(files)} recipe(s) invalid", err=True)
        sys.exit(EXIT_INVALID_RECIPE)


def _print_skipped(skipped) -> None:
    for item in skipped:
        click.echo(f"skipped {item.name}: {item.reason}", err=True)


@cli.command()
@click.option("--runtime", help="Print this runtime's schema instead of the common one.")
def schema(runtime: str | None) -> None:
    """Print the recipe JSON Schema."""
    from .discovery import get_runtime
    from .recipe.schemas import recipe_schema

    doc = get_runtime(runtime).schema() if runtime else recipe_schema()
    click.echo(json.dumps(doc, indent=2))


@cli.command()
@click.argument("recipes", nargs=-1, required=True, type=click.Path())
@click.option("--dry-run", is_flag=True, help="Print the plan (cached or to build, per step) and stop.")
@click.option("--force", is_flag=True, help="Rebuild even when the store has the artifact.")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=1, show_default=True,
              help="Variants built at once on this machine (admitted by their memory estimates).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="Where variants run: local processes, or Ray tasks (needs engine[ray]).")
@click.option("--address", help="The Ray cluster (host:port) for --executor ray. [default $RAY_ADDRESS, else "
              "a cluster of this machine]")
@click.option("--retries", type=click.IntRange(min=0), default=1, show_default=True,
              help="Times a variant whose worker died is run again (--jobs > 1 or --executor ray).")
@click.option("--max-memory", metavar="SIZE", help="Refuse a step whose estimated peak memory is above SIZE "
              "(12G, 11.5GiB, 800M). Default: the memory available now (MemAvailable).")
@click.option("--force-memory", is_flag=True, help="Run steps even when their memory estimate does not fit.")
@click.pass_obj
def apply(loc: Locations, recipes: tuple[str, ...], dry_run: bool, force: bool, jobs: int, executor: str,
          address: str | None, retries: int, max_memory: str | None, force_memory: bool) -> None:
    """Validate, plan, run the missing steps and register each recipe's variant."""
    from .executors import make_executor
    from .memory import parse_size
    from .pipeline import apply_recipes
    from .recipe import load_recipes

    try:
        limit = parse_size(max_memory) if max_memory is not None else None
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--max-memory") from None
    runner = make_executor(jobs, executor, address, retries)  # before any work: a missing Ray says so now

    loaded, skipped = [], []
    for path in recipes:  # every recipe valid before any work
        variants, skipped_here = load_recipes(path)
        loaded += variants
        skipped += skipped_here
    _print_skipped(skipped)

    def show(outcome) -> None:
        _terminal().clear()  # the live progress line, on a terminal
        if outcome.error is not None:
            if len(loaded) > 1:
                error = outcome.error
                click.echo(f"{outcome.name}: FAILED: {error.message}" + (f"\n  hint: {error.hint}" if error.hint else ""),
                           err=True)
        elif dry_run:
            _print_plan(outcome.result)
        else:
            _print_applied(outcome.result)

    from .progress import reporting

    with reporting(_terminal()):  # digest, download, build and scoring tasks: live on a terminal
        result = apply_recipes(loaded, loc, force=force, dry_run=dry_run, progress=_progress, on_outcome=show,
                               executor=runner if len(loaded) > 1 else None, max_memory=limit,
                               force_memory=force_memory)
    failed = result.failed
    if len(loaded) == 1 and failed:
        raise failed[0].error
    if failed:
        click.echo(f"{len(failed)} of {len(loaded)} variant(s) failed", err=True)
        sys.exit(failed[0].error.exit_code)


def _print_plan(result) -> None:
    click.echo(f"plan for {result.plan.recipe.name}:")
    for step in result.plan.steps:
        status = {"cached": "cached", "missing": "to build", "local": "local folder", "hub": "hub"}[step.status]
        click.echo(f"  {step.kind:<7} {status:<12} {step.key[:16]}…  {step.detail}{_memory(step)}")


def _memory(step) -> str:
    """The step's memory estimate for the plan (engine.memory)."""
    from .memory import gb

    if step.memory_estimate is None:
        return "" if step.kind == "source" else "  [memory: no estimate (no safetensors header or config.json yet)]"
    return f"  [memory ~{gb(step.memory_estimate)}: {step.memory_note}]"


def _print_applied(result) -> None:
    v = result.variant
    ref = v.ref
    if result.rebuilt_nothing:
        state = "registered (artifact was cached)" if result.created else "up to date"
        click.echo(f"{ref}: {state}, nothing rebuilt ({result.seconds:.2f} s)")
        return
    built = ", ".join(f"{s.kind} {s.duration_s:.1f} s" for s in result.ran if not s.cached)
    click.echo(f"{ref}: built ({built}) and registered, {v.size_bytes:,} bytes")


_TERMINAL = None


def _terminal():
    """The engine's progress on the real stderr (engine.quiet.terminal: a step sends fds 1 and 2 to
    its log): one live line on a terminal, a few short lines otherwise (engine.progress)."""
    global _TERMINAL
    if _TERMINAL is None:
        from .progress import Terminal
        from .quiet import terminal

        _TERMINAL = Terminal(terminal(2))
    return _TERMINAL


def _progress(name: str):
    """Step lines for one variant (the tools' own output only on a terminal, where it replaces itself)."""
    term = _terminal()
    return lambda message, detail=False: term.message(name, message, detail)


def _generation_options(fn):
    """Decoding options shared by `run` and `chat`."""
    for option in reversed([
        click.option("--max-new-tokens", type=click.IntRange(1), default=128, show_default=True),
        click.option("--temperature", type=click.FloatRange(min=0.0), help="Sampling temperature (implies --sample)."),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0), help="Nucleus sampling (implies --sample)."),
        click.option("--top-k", type=click.IntRange(1), help="Top-k sampling (implies --sample)."),
        click.option("--seed", type=int, help="Random seed for sampling."),
        click.option("--sample", is_flag=True, help="Sample instead of greedy decoding."),
        click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
    ]):
        fn = option(fn)
    return fn


def _settings(max_new_tokens, temperature, top_p, top_k, seed, sample, stop) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
            "seed": seed, "do_sample": sample or any(v is not None for v in (temperature, top_p, top_k)),
            "stop": list(stop)}


@cli.command()
@click.argument("ref")
@click.argument("prompt")
@click.option("--chat", "as_chat", is_flag=True, help="Send PROMPT as a user message through the chat template.")
@_generation_options
@click.pass_obj
def run(loc: Locations, ref: str, prompt: str, as_chat: bool, **options) -> None:
    """Stream the model's answer to PROMPT."""
    from .loader import load
    from .quiet import captured, terminal

    out = terminal(1)  # only the answer reaches stdout; the libraries' output goes to the store's log
    with captured(loc.store / "logs" / "run.log") as log:
        model = load(ref, registry=loc.registry, store=loc.store)
        text = [{"role": "user", "content": prompt}] if as_chat else prompt
        with _backend_errors(model, log):
            for piece in model.stream(text, **_settings(**options)):
                out.write(piece)
                out.flush()
    out.write("\n")
    out.flush()


class _backend_errors:
    """A backend's exception while generating: one message naming the runtime and the log."""

    def __init__(self, model, log) -> None:
        self.model, self.log = model, log

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        from .errors import BackendFailed

        if exc is None or isinstance(exc, (EngineError, KeyboardInterrupt, click.exceptions.Exit)):
            return False
        said = " ".join(str(exc).split())[:400] or exc_type.__name__
        raise BackendFailed(f"{self.model.info.runtime} failed while generating with {self.model.name}: {said}",
                            hint=f"the library's own output is in {self.log}") from exc


@cli.command()
@click.argument("ref")
@click.option("--system", help="A system message to start the conversation with.")
@_generation_options
@click.pass_obj
def chat(loc: Locations, ref: str, system: str | None, **options) -> None:
    """Talk to a variant in the terminal (its chat template; history kept; Ctrl-D or Ctrl-C ends)."""
    from .loader import load
    from .quiet import captured, terminal

    out, log = terminal(1), loc.store / "logs" / "run.log"  # libraries' output: the log, as in `engine run`
    with captured(log):
        model = load(ref, registry=loc.registry, store=loc.store)
    model.apply_chat_template([{"role": "user", "content": ""}])  # no template: say so before the first prompt
    history = [{"role": "system", "content": system}] if system else []
    settings = _settings(**options)
    click.echo(f"chatting with {model.name}; Ctrl-D to end", err=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            click.echo("", err=True)
            return
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        answer = []
        try:
            with captured(log), _backend_errors(model, log):
                for piece in model.stream(history, **settings):
                    answer.append(piece)
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            pass
        out.write("\n")
        out.flush()
        history.append({"role": "assistant", "content": "".join(answer)})


#: above this many rows `engine ls` prints plain aligned text even on a terminal (rich is slow there)
_RICH_ROWS = 200


@cli.command("ls")
@click.argument("patterns", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (stable keys).")
@click.option("--all", "all_versions", is_flag=True, help="Every version, not only the latest.")
@click.option("--runtime", help="Only variants of this runtime.")
@click.option("--dtype", help="Only variants of this weight dtype (int4, int8, nf4, ...).")
@click.option("--sort", type=click.Choice(["name", "size", "ppl", "kl", "created"]), default="name",
              show_default=True, help="Order (size, ppl, kl: smallest first; created: newest first).")
@click.option("--limit", type=click.IntRange(1), help="At most this many rows.")
@click.pass_obj
def ls_cmd(loc: Locations, patterns: tuple[str, ...], as_json: bool, all_versions: bool, runtime: str | None,
           dtype: str | None, sort: str, limit: int | None) -> None:
    """List the registered variants; PATTERNS select names (shell wildcards, e.g. 'wt2-*').

    A table on a terminal; plain aligned columns when piped or longer than 200 rows.
    """
    import gc

    from .catalog import list_variants, score_methods
    from .render import ls_cells, ls_json, ls_text

    gc.disable()  # tens of thousands of short-lived strings and tuples, no cycles: nothing to collect

    listed = list_variants(loc, all_versions=all_versions, patterns=patterns, runtime=runtime, dtype=dtype,
                           sort=sort, limit=limit)
    if as_json:
        click.echo(ls_json(listed))
        return
    if not listed:
        what = "matching variants" if patterns or runtime or dtype else "variants"
        click.echo(f"no {what} in {loc.registry}" + ("" if what != "variants" else "; run `engine apply RECIPE.yaml`"),
                   err=True)
        return
    headers, cells, notes = ls_cells(listed)
    if notes:  # values of different methods: the footnotes say which method each letter is
        ids = {mid for v in listed if v.methods for mid in v.methods.split("\t")} - {"", "-"}
        headers, cells, notes = ls_cells(listed, methods=score_methods(ids, loc))
    if sys.stdout.isatty() and len(listed) <= _RICH_ROWS:
        from .render import ls_table

        table, _ = ls_table(listed)
        console = _console()
        console.print(table)
        for note in notes:
            console.print(note)
        return
    click.echo(ls_text(headers, cells))
    for note in notes:
        click.echo(note)


@cli.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def show(loc: Locations, ref: str, as_json: bool) -> None:
    """Everything recorded about one variant (NAME or NAME@VERSION)."""
    from .catalog import show as describe
    from .render import show_text

    _emit(describe(ref, loc), as_json, show_text, gap=True)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_obj
def diff(loc: Locations, a: str, b: str, as_json: bool) -> None:
    """Compare two variants: recipe fields, files, scores (only like-for-like scores get a delta)."""
    from .catalog import diff as compare
    from .diff import diff_text

    _emit(compare(a, b, loc), as_json, diff_text)


@cli.command()
@click.argument("patterns", nargs=-1)
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="report.html", show_default=True,
              help="The HTML page to write (self-contained).")
@click.option("--png", type=click.Path(dir_okay=False), help="Also the plot as a PNG. [default: OUTPUT with .png]")
@click.option("--metric", type=click.Choice(["perplexity", "kl_divergence"]), default="perplexity",
              show_default=True, help="The quality axis of the Pareto plot.")
@click.pass_obj
def report(loc: Locations, patterns: tuple[str, ...], output: str, png: str | None, metric: str) -> None:
    """Write an HTML page (and PNG) with the variants' scores and a size-vs-quality Pareto plot.

    PATTERNS select variants by name (shell wildcards, e.g. 'wt2-*'); none means all.
    """
    from pathlib import Path

    from .catalog import with_registry
    from .report import write_report
    from .report_rows import report_rows

    rows = with_registry(loc, lambda reg: report_rows(reg, patterns))
    if not rows:
        raise VariantNotFound("no variant matches " + " ".join(patterns) if patterns else "the registry is empty")
    png_path = Path(png) if png else Path(output).with_suffix(".png")
    result = write_report(rows, Path(output), png_path, y_metric=metric)
    click.echo(f"wrote {output} and {png_path}: {result['plotted']} plotted, "
               f"Pareto front: {', '.join(result['front']) or '-'}")
    for name in result["skipped"]:
        click.echo(f"  not plotted (no {metric} or size): {name}", err=True)
    for item in result["not_comparable"]:
        click.echo(f"  not comparable (different evaluation method): {item['name']}", err=True)


@cli.command()
@click.argument("ref", required=False)
@click.pass_obj
def verify(loc: Locations, ref: str | None) -> None:
    """Re-hash artifact files against the registry; exit 4 naming what is missing or changed."""
    from .verification import verify as verify_all

    reports = verify_all(ref, loc)
    failed = [r for r in reports if not r.ok]
    for report in reports:
        click.echo(f"{report.variant}: {'ok' if report.ok else 'FAILED'} ({report.checked} files)")
        for problem in report.problems:
            click.echo(f"  {problem}", err=True)
    if failed:
        click.echo(f"{len(failed)} of {len(reports)} variant(s) failed verification", err=True)
        sys.exit(EXIT_VERIFY_FAILED)


@cli.command()
@click.argument("ref")
@click.option("--force", is_flag=True, help="remove it even when other variants were built from it")
@click.pass_obj
def rm(loc: Locations, ref: str, force: bool) -> None:
    """Remove NAME (every version) or NAME@VERSION from the registry; `engine gc` frees the files."""
    from .catalog import with_registry

    for variant in with_registry(loc, lambda reg: reg.remove(ref, force=force), readonly=False):
        click.echo(f"removed {variant.ref}")
    click.echo("run `engine gc` to delete store entries no variant uses any more", err=True)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only list what would be deleted.")
@click.option("--forget", multiple=True, type=click.Path(dir_okay=False),
              help="A registry that used this store and was deleted on purpose: stop keeping its entries.")
@click.pass_obj
def gc(loc: Locations, dry_run: bool, forget: tuple[str, ...]) -> None:
    """Delete store entries that no registry sharing the store references (refuses during an apply)."""
    from .collect import gc as collect
    from .render import human_size

    report = collect(loc, dry_run=dry_run, forget=forget)
    for freed in report.entries:
        click.echo(f"{'would delete' if dry_run else 'deleted'} {freed.key[:16]}… ({human_size(freed.size)})")
    click.echo(f"{'would free' if dry_run else 'freed'} {human_size(report.bytes)}")


def _emit(doc: dict, as_json: bool, render, gap: bool = False) -> None:
    """A document as stable JSON, or as the renderables `render(doc)` makes for people."""
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    console = _console()
    for part in render(doc):
        console.print(part)
        if gap:
            console.print()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: map errors to one message and an exit code."""
    debug = os.environ.get("ENGINE_DEBUG") not in (None, "", "0")
    try:
        cli.main(args=argv, prog_name="engine", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except RecipeInvalid as error:
        if debug:
            raise
        click.echo(error.message, err=True)
        n = len(error.issues)
        click.echo(f"recipe invalid: {n} problem{'s' if n != 1 else ''}", err=True)
        sys.exit(error.exit_code)
    except EngineError as error:
        if debug:
            raise
        click.echo(f"error: {error.message}", err=True)
        if error.hint:
            click.echo(f"hint: {error.hint}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing half-written was kept", err=True)
        sys.exit(130)
    except Exception as error:  # a bug in the engine, not the user's mistake
        if debug:
            raise
        if isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS:  # the machine's fault
            click.echo(f"error: {error.filename or 'a file'}: {error.strerror}", err=True)
            click.echo("hint: free space or fix the permissions of that path, then run the command again", err=True)
            sys.exit(EXIT_ERROR)
        click.echo(f"internal error: {type(error).__name__}: {error}", err=True)
        click.echo("hint: set ENGINE_DEBUG=1 for the traceback, and please report it", err=True)
        sys.exit(EXIT_INTERNAL)


if __name__ == "__main__":  # pragma: no cover
    main()
