"""Run a backend tool as a child process whose output goes to a log, and which dies with us.

Heavy converters run in a child so a crash in native code cannot take the engine's bookkeeping
with it, and so `kill -9` of the engine also stops the child (PR_SET_PDEATHSIG) instead of leaving
it writing into a staging folder nobody will commit.

The engine's own build children (`python -m engine.runtimes.<x>_build`) share one protocol:
`run_job` (parent) writes logs/job.json and reads logs/result.json, `child_main` (child) reads the
job and writes the result, or {"error", "hint"} when the child raised `JobError` for a user's
mistake that only the model reveals. The child side imports nothing heavy.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from . import progress
from .errors import BuildFailed

_PR_SET_PDEATHSIG = 1
#: a build child's exit code for a user's mistake (JobError), as opposed to a crash
EXIT_JOB_ERROR = 3
JOB_FILE, RESULT_FILE = "job.json", "result.json"


#: signals held while forking the child (see _held)
_HELD = {signal.SIGINT, signal.SIGTERM}


def _die_with_parent() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)  # the child starts with the signals the parent held
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the child may outlive us, staging is still never trusted
        pass


@contextlib.contextmanager
def _held() -> Iterator[None]:
    """Hold Ctrl-C / SIGTERM while the child is forked: a KeyboardInterrupt raised inside the fork
    handlers (logging's at-fork lock release) is printed as "ignored" and lost, and the build would
    run on. Held, the signal arrives right after, where the caller kills the child."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def run_logged(
    cmd: Sequence[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    what: str = "build",
) -> None:
    """Run `cmd`, appending its combined output to `log_path`; BuildFailed on a non-zero exit."""
    with open(log_path, "ab") as log, progress.child_channel() as (channel, fds, close_ours):
        full_env = {**os.environ, **(env or {}), **channel}  # the child's tasks reach our terminal
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = None
        try:
            with _held():
                proc = subprocess.Popen(
                    list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
                    cwd=cwd, preexec_fn=_die_with_parent, pass_fds=fds,
                )
            close_ours()  # the child holds the write end now: the reader ends when it exits
            _pump(proc, log, on_line)
        except BaseException:  # Ctrl-C or an error on our side: the child must not outlive the step
            if proc is not None:
                proc.kill()
                proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        raise BuildFailed(f"{what} failed (exit {code}): {_last_words(log_path)}")


def _pump(proc: subprocess.Popen, log, on_line: Callable[[str], None] | None) -> None:
    """Copy the child's output to the log as it comes, passing whole lines to on_line."""
    assert proc.stdout is not None
    pending = b""
    for chunk in iter(lambda: proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
        log.write(chunk)
        if on_line:
            pending += chunk
            *lines, pending = pending.replace(b"\r", b"\n").split(b"\n")
            for line in lines:
                if line.strip():
                    on_line(line.decode("utf-8", "replace")[:200])


#: the last line of a Python traceback: `ValueError: ...`, `onnxruntime.capi...Fail: ...`
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Fail|Failure|Interrupt|Exit)\b:?.*")


def _last_words(path: Path, lines: int = 8) -> str:
    """What a failed tool said last: its exception line when it died of a Python exception (the
    traceback stays in the log the hint names), else the last lines of its log."""
    data = path.read_bytes()[-16384:].decode("utf-8", "replace").replace("\r", "\n")
    text = [line.rstrip() for line in data.splitlines() if line.strip()]
    for line in reversed(text):
        if _EXCEPTION_LINE.match(line.strip()):
            return line.strip()[:500]
    return "last lines of its log:\n" + "\n".join("    " + line for line in text[-lines:])


# -- the build-job protocol ----------------------------------------------------------------------
class JobError(Exception):
    """Raised in a build child for a user's mistake: reported as a message and hint, no traceback."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint


def run_job(module: str, job: dict, logs_dir: Path, *, what: str,
            on_line: Callable[[str], None] | None = None, env: dict[str, str] | None = None,
            python: str | Path | None = None) -> dict[str, Any]:
    """Run `python -m <module> logs_dir/job.json` and return the dict it wrote to logs_dir/result.json.

    `python` is the interpreter (a runtime's build environment, engine.buildenv); ours by default.

    The files stay beside build.log, so a failed build keeps what it was asked and what it said.
    BuildFailed on a user's mistake (the child's message, its hint in the message: the pipeline's
    hint names the log), on a crash (the log's tail), or when the child reported nothing.
    """
    job_path, result_path = logs_dir / JOB_FILE, logs_dir / RESULT_FILE
    job_path.write_text(json.dumps(job, indent=1), encoding="utf-8")
    result_path.unlink(missing_ok=True)  # never read a result an earlier run left behind
    cmd = [str(python or sys.executable), "-m", module, str(job_path)]
    try:
        run_logged(cmd, logs_dir / "build.log", env=env, on_line=on_line, what=what)
    except BuildFailed:
        _raise_job_error(_read_result(result_path))
        raise
    result = _read_result(result_path)
    if result is None:
        raise BuildFailed(f"{what} exited without writing {RESULT_FILE}")
    return result


def _read_result(path: Path) -> dict[str, Any] | None:
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or cut short by a crash
        return None
    return result if isinstance(result, dict) else None


def _raise_job_error(result: dict[str, Any] | None) -> None:
    """A child's report of a user's mistake, as the BuildFailed the user sees."""
    if result and result.get("error"):
        hint = result.get("hint")
        raise BuildFailed(str(result["error"]) + (f" ({hint})" if hint else "")) from None


def child_main(run: Callable[[dict], dict], argv: Sequence[str]) -> int:
    """The child's side of run_job: `run(job)` and write its result beside job.json; the exit code.

    A JobError becomes {"error", "hint"} and exit 3; any other exception propagates (a traceback in
    the build log, exit 1) and leaves no result, so the parent reports a crash.
    """
    job_path = Path(argv[0])
    job = json.loads(job_path.read_text(encoding="utf-8"))
    result_path = job_path.with_name(RESULT_FILE)
    try:
        result = run(job)
    except JobError as error:
        result_path.write_text(json.dumps({"error": str(error), "hint": error.hint}), encoding="utf-8")
        print(f"error: {error}" + (f"\nhint: {error.hint}" if error.hint else ""), file=sys.stderr, flush=True)
        return EXIT_JOB_ERROR
    result_path.write_text(json.dumps(result, sort_keys=True), encoding="utf-8")
    return 0
