"""Run the real CLI as a subprocess, the way a user does, for the end-to-end tests.

Every run also checks that no library's own output reached the terminal (issue 16): Python warnings,
torch's glog-style lines, onnxruntime / OpenVINO log lines, progress bars, optimum-intel's notices
and tracebacks belong in the step's log, never on the user's stdout or stderr.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

#: lines only a library writes (the engine's own lines never look like these)
LIBRARY_LINES = re.compile(
    r"^\s*(?:"
    r"\S+:\d+: \w*Warning\b"                   # warnings.warn: "file.py:12: FutureWarning: ..."
    r"|\w*Warning: "                           # a bare "UserWarning: ..." line
    r"|[WEIF]\d{4} \d\d:\d\d:\d\d"             # torch / glog: "W1130 12:54:51.538000 ..."
    r"|\[[WEIV]:onnxruntime:"                  # onnxruntime's logger
    r"|Traceback \(most recent call last\)"
    r"|Could not infer whether the model"      # optimum-intel at load
    r"|\[Errno 2\] No such file or directory: .*refs/main"
    r"|.*\d+%\|.*\| \d+/\d+ \["                # tqdm progress bars
    r")", re.MULTILINE)


def library_lines(text: str) -> list[str]:
    """The lines of `text` that a library, not the engine, wrote."""
    return [m.group(0) for m in LIBRARY_LINES.finditer(text)]


def engine(*args: str, cwd: Path, check: int | None = 0, env: dict | None = None,
           chatter_ok: bool = False) -> subprocess.CompletedProcess:
    """`python -m engine ARGS` in `cwd` (so registry.db and .engine/ land there); assert the exit code
    and (unless chatter_ok) that no library line reached stdout or stderr."""
    proc = subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "ENGINE_DEBUG": "", **(env or {})}, timeout=1800)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    if not chatter_ok:
        found = library_lines(proc.stdout) + library_lines(proc.stderr)
        assert not found, f"library output reached the terminal in `engine {' '.join(args)}`: {found[:5]}"
    return proc


def private_copy(folder: Path, tmp_path: Path) -> Path:
    """A copy of a module-scoped work folder (registry, store, recipes) for a test that changes it,
    so module fixtures stay as they were built."""
    import shutil

    target = tmp_path / "own"
    shutil.copytree(folder, target)
    return target


def python_json(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON document on its last line."""
    import json
    import textwrap

    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_synthetic_in_child(spec: dict, folder: Path) -> Path:
    """A seeded synthetic model (engine.synthetic, defaults filled in) written by a fresh child, as the
    engine makes it, so the test process imports no torch for it."""
    import json

    subprocess.run([sys.executable, "-c", "import sys, json; from pathlib import Path; "
                    "from engine.synthetic import make_synthetic_model, with_defaults; "
                    "make_synthetic_model(with_defaults(json.loads(sys.argv[1])), Path(sys.argv[2]))",
                    json.dumps(spec), str(folder)], check=True, capture_output=True)
    return folder
