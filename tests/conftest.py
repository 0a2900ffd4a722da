"""Session-wide settings for the test run.

Build environments (engine.buildenv) are shared by the whole session through ENGINE_ENVS, so the
transformers runtime's environment is created from the package index once per run, whichever test
first builds with it, and every CLI subprocess inherits the setting. The engine's own site-packages
is listed at the start so a test can check that creating an environment never modified it.
"""
from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from pathlib import Path

_OWN = "ENGINE_ENVS" not in os.environ
if _OWN:
    os.environ["ENGINE_ENVS"] = tempfile.mkdtemp(prefix="engine-test-envs-")


def site_packages_listing() -> dict[str, str]:
    """What is installed in the engine's site-packages: each distribution's dist-info folder (its name
    holds the version) with its RECORD, and each .pth file with its text."""
    folder = Path(sysconfig.get_paths()["purelib"])
    found = {}
    for path in folder.iterdir():
        if path.name.endswith(".dist-info") and (path / "RECORD").is_file():
            found[path.name] = (path / "RECORD").read_text(encoding="utf-8", errors="replace")
        elif path.suffix == ".pth":
            found[path.name] = path.read_text(encoding="utf-8", errors="replace")
    return found


#: the engine's environment as the session found it
SITE_AT_START = site_packages_listing()


def pytest_unconfigure(config) -> None:
    if _OWN:
        shutil.rmtree(os.environ["ENGINE_ENVS"], ignore_errors=True)
