"""Build environments: a virtualenv of a runtime's own for builds whose libraries cannot share ours.

Some quantizers pin library versions the engine's environment cannot hold (llm-compressor wants
transformers 5.15-5.17; optimum-intel and the ORT GenAI builder hold ours at 5.2-5.5). Such a runtime
declares a `BuildEnv`: a lock file in this repository listing every distribution the environment
installs itself, each pinned. The engine makes the environment once under `<store>/envs/` (or
$ENGINE_ENVS), reuses it,
and runs the runtime's build child with its interpreter (engine.subproc.run_job(python=...)).

How it stays small and harmless:
- the env's site-packages comes first on sys.path, then the engine's own site-packages (a .pth that calls
  site.addsitedir after the env's own packages): torch, numpy, safetensors and the engine itself are
  reused, so the env costs hundreds of MB, not the GBs of a second torch;
- `pip install --no-deps --ignore-installed -r LOCK`: exactly the locked distributions go into the env,
  whatever the engine's environment happens to hold, and pip never resolves (so never touches) anything
  outside them; pip also refuses to uninstall outside a virtualenv, so the engine's environment is never
  modified (tests/test_buildenv.py checks its listing before and after);
- `pip check` afterwards: a locked distribution whose own requirements are not met fails creation;
- atomic: built in `<store>/envs/.tmp-*`, renamed into place when complete and checked; a failure removes
  the temporary folder and names the requirement pip could not install. A lock file serialises creators.

pip is the env's own `python -m pip`, so it reads the user's index settings (PIP_INDEX_URL, pip.conf)
itself. The lock (the pins) enters the build step's key; it is known without creating the env, so
planning stays instant.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .filelock import exclusive

#: written last into a complete env: its presence means "usable"
READY = "engine-env.json"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
#: pip's words for a requirement it could not get, and the requirement they name
_PIP_FAILED = (
    re.compile(r"No matching distribution found for (\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement (\S+)"),
    re.compile(r"ERROR: Could not install packages .*?: (.*)"),
)


#: progress(message, detail)
Progress = Callable[[str, bool], None]


class BuildEnvFailed(EngineError):
    """A build environment could not be created (offline, a requirement not on the index, ...)."""


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class BuildEnv:
    """A runtime's build environment: a name and a lock file of exact pins (`name==version` lines)."""

    name: str
    lock_file: Path

    def lock(self) -> dict[str, str]:
        """{distribution: version} from the lock file; every line must be an exact pin."""
        pins: dict[str, str] = {}
        for number, raw in enumerate(self.lock_file.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            match = _PIN.match(line)
            if not match:
                raise EngineError(f"{self.lock_file}:{number}: a build environment lock needs exact pins "
                                  f"(name==version), got {line!r}")
            pins[_normalize(match.group(1))] = match.group(2)
        return dict(sorted(pins.items()))

    def key(self) -> dict:
        """What the env's contents depend on: the pins, the interpreter, and the environment it extends."""
        return {"lock": self.lock(), "python": sys.version.split()[0], "base": _base_site_packages()}

    def folder(self, envs_dir: Path) -> Path:
        digest = hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]
        return Path(envs_dir) / f"{self.name}-{digest}"

    def python(self, envs_dir: Path) -> Path:
        return self.folder(envs_dir) / "bin" / "python"

    def ensure(self, envs_dir: Path, progress: Progress = lambda message, detail=False: None) -> Path:
        """The env's interpreter, creating the env first when it does not exist (once; others wait).
        progress(message, detail): detail=True for pip's own lines."""
        folder = self.folder(envs_dir)
        if (folder / READY).is_file():
            return folder / "bin" / "python"
        envs_dir = Path(envs_dir)
        envs_dir.mkdir(parents=True, exist_ok=True)
        with exclusive(envs_dir / f"{folder.name}.lock"):
            if not (folder / READY).is_file():
                self._create(folder, progress)
        return folder / "bin" / "python"

    # -- creation ------------------------------------------------------------------------------------
    def _create(self, folder: Path, progress: Progress) -> None:
        started = time.perf_counter()
        progress(f"creating the build environment {folder.name} (once; pip installs {len(self.lock())} "
                 f"pinned packages from {self.lock_file.name}, torch and the rest come from this environment)")
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete one (no READY): never trusted
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        log = folder.with_name(f"{folder.name}.log")
        try:
            self._populate(tmp, log, progress)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        size = _tree_bytes(folder)
        record = {"name": self.name, "lock_file": str(self.lock_file), **self.key(), "seconds": round(seconds, 1),
                  "bytes": size, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (folder / READY).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        progress(f"build environment ready in {seconds:.0f} s ({size / 1e6:.0f} MB on disk): {folder}", False)

    def _populate(self, tmp: Path, log: Path, progress: Progress) -> None:
        run = _Runner(log, progress)
        run([sys.executable, "-m", "venv", str(tmp)], "python -m venv")
        python = tmp / "bin" / "python"
        site = Path(subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
        # after the env's own packages (a .pth runs when site processes the env's site-packages)
        (site / "zz_engine_base.pth").write_text(f"import site; site.addsitedir({_base_site_packages()!r})\n",
                                                  encoding="utf-8")
        run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-warn-conflicts",
             "--disable-pip-version-check", "-r", str(self.lock_file)], "pip install")
        self._check(python, site, log)

    def _check(self, python: Path, site: Path, log: Path) -> None:
        """The env holds exactly the lock, and every locked distribution's own requirements are met."""
        frozen = subprocess.run([str(python), "-m", "pip", "freeze", "--path", str(site)], capture_output=True,
                                text=True, check=True).stdout
        got = {_normalize(m.group(1)): m.group(2) for m in map(_PIN.match, frozen.split()) if m}
        want = self.lock()
        if got != want:
            diff = sorted(set(got.items()) ^ set(want.items()))
            raise BuildEnvFailed(f"the build environment {self.name} does not match its lock {self.lock_file}: "
                                 + ", ".join(f"{n}=={v}" for n, v in diff[:8]))
        check = subprocess.run([str(python), "-m", "pip", "check"], capture_output=True, text=True)
        broken = [line for line in check.stdout.splitlines()
                  if line.split(" ", 1)[0] and _normalize(line.split(" ", 1)[0]) in want]
        if broken:
            with open(log, "a", encoding="utf-8") as out:
                out.write(check.stdout)
            raise BuildEnvFailed(f"the build environment {self.name} is incomplete: {broken[0]}",
                                 hint=f"add the missing distribution to {self.lock_file} or install it in "
                                      f"this environment; pip's report: {log}")


class _Runner:
    """Run a creation command with its output in the log and its lines as progress."""

    def __init__(self, log: Path, progress: Progress) -> None:
        self.log, self.progress = log, progress
        log.write_text("", encoding="utf-8")

    def __call__(self, cmd: list[str], what: str) -> None:
        with open(self.log, "a", encoding="utf-8") as out:
            out.write("$ " + " ".join(cmd) + "\n")
            out.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env={**os.environ, "PYTHONNOUSERSITE": "1"})
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.startswith(("Collecting", "Downloading", "Installing", "Successfully")):
                    self.progress(line.strip()[:160], True)
            code = proc.wait()
        if code != 0:
            text = self.log.read_text(encoding="utf-8", errors="replace")
            failed = next((m.group(1) for pattern in _PIP_FAILED for m in pattern.finditer(text)), None)
            said = f"pip could not install {failed}" if failed else f"{what} failed (exit {code})"
            raise BuildEnvFailed(
                f"cannot create the build environment: {said}",
                hint=f"the build environment installs from the package index your pip uses (PIP_INDEX_URL, "
                     f"pip.conf); on a machine without it, point PIP_INDEX_URL / PIP_FIND_LINKS at a mirror or "
                     f"a folder of wheels; pip's log: {self.log}")


def envs_dir(store_root: Path) -> Path:
    """Where build environments live: $ENGINE_ENVS (several stores, or a test session, share them),
    else `<store>/envs`."""
    return Path(os.environ.get("ENGINE_ENVS") or Path(store_root) / "envs").absolute()


def _base_site_packages() -> str:
    """The engine's own site-packages (where torch is), appended after the env's."""
    return sysconfig.get_paths()["purelib"]


def _tree_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def env_description(python: Path) -> dict:
    """The READY record of the env an interpreter belongs to (for a build's facts)."""
    try:
        return json.loads((Path(python).parent.parent / READY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


__all__ = ["BuildEnv", "BuildEnvFailed", "env_description", "envs_dir"]
