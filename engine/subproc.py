"""Run a backend tool as a child process whose output goes to a log, and which dies with us.

Heavy converters run in a child so a crash in native code cannot take the engine's bookkeeping
with it, and so `kill -9` of the engine also stops the child (PR_SET_PDEATHSIG) instead of leaving
it writing into a staging folder nobody will commit.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import BuildFailed

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # not Linux: the child may outlive us, staging is still never trusted
        pass


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
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=full_env,
            cwd=cwd, preexec_fn=_die_with_parent,
        )
        try:
            _pump(proc, log, on_line)
        except BaseException:  # Ctrl-C or an error on our side: the child must not outlive the step
            proc.kill()
            proc.wait()
            raise
        code = proc.wait()
    if code != 0:
        tail = _tail(log_path, 15)
        raise BuildFailed(f"{what} failed (exit {code}); last lines of its log:\n{tail}")


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


def _tail(path: Path, lines: int) -> str:
    data = path.read_bytes()[-8192:].decode("utf-8", "replace").replace("\r", "\n")
    return "\n".join("    " + line for line in data.splitlines()[-lines:])
