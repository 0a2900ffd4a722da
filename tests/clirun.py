"""Run the real CLI as a subprocess, the way a user does, for the end-to-end tests."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def engine(*args: str, cwd: Path, check: int | None = 0, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m engine ARGS` in `cwd` (so registry.db and .engine/ land there); assert the exit code."""
    proc = subprocess.run([sys.executable, "-m", "engine", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "ENGINE_DEBUG": "", **(env or {})}, timeout=1800)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def private_copy(folder: Path, tmp_path: Path) -> Path:
    """A copy of a module-scoped work folder (registry, store, recipes) for a test that changes it,
    so module fixtures stay as they were built."""
    import shutil

    target = tmp_path / "own"
    shutil.copytree(folder, target)
    return target
