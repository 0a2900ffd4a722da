"""llama.cpp's converter and command-line tools, taken from the installed llama-cpp-python's own sdist.

The llama-cpp-python wheel holds the shared libraries only. Its sdist vendors the matching
llama.cpp tree: `convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py`, and the
sources of `llama-imatrix` and `llama-quantize`. `install()` downloads that sdist with pip (the
version of the installed llama-cpp-python, so converter, tools and loader are one llama.cpp
release), copies the converter out and builds the two tools with cmake. Nothing of llama.cpp is
kept in this repository. The result is a folder `llama-cpp-python-<version>/` under `home()`,
published with one rename (a half-made toolkit never looks complete), with `toolkit.json` naming
the sdist and its sha256.

    python -m engine.runtimes.llamacpp_tools install     # `make install` runs this
    python -m engine.runtimes.llamacpp_tools status
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from ..errors import RuntimeUnavailable

DISTRIBUTION = "llama-cpp-python"
HOME_ENV = "ENGINE_LLAMACPP_HOME"
TOOLS = ("llama-imatrix", "llama-quantize")
#: what is copied out of the sdist's vendor/llama.cpp (the converter and the gguf-py it imports)
CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "LICENSE")
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF")
INSTALL_HINT = "run `make install`, or `python -m engine.runtimes.llamacpp_tools install` (builds llama.cpp's tools, a few minutes)"


def home() -> Path:
    """Where toolkits live: $ENGINE_LLAMACPP_HOME, else <environment>/share/engine/llama.cpp."""
    env = os.environ.get(HOME_ENV)
    return Path(env).expanduser() if env else Path(sys.prefix) / "share" / "engine" / "llama.cpp"


def installed_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise RuntimeUnavailable(f"runtime 'llama.cpp' needs {DISTRIBUTION}, which is not installed",
                                 hint="pip install 'engine[llamacpp]' (builds llama.cpp from its sdist, ~7 min)") from None


@dataclass(frozen=True)
class Toolkit:
    root: Path
    info: dict

    @property
    def converter(self) -> Path:
        return self.root / "convert_hf_to_gguf.py"

    def tool(self, name: str) -> Path:
        return self.root / "bin" / name

    @property
    def version(self) -> str:
        return self.info["llama_cpp_python"]


def find(version: str | None = None) -> Toolkit:
    """The toolkit matching the installed llama-cpp-python; RuntimeUnavailable naming the fix."""
    version = version or installed_version()
    root = home() / f"llama-cpp-python-{version}"
    try:
        info = json.loads((root / "toolkit.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise RuntimeUnavailable(
            f"llama.cpp's converter and tools for llama-cpp-python {version} are not installed (looked in {root})",
            hint=INSTALL_HINT) from None
    kit = Toolkit(root, info)
    missing = [str(p) for p in [kit.converter, *(kit.tool(t) for t in TOOLS)] if not p.exists()]
    if missing:
        raise RuntimeUnavailable(f"the llama.cpp toolkit in {root} is incomplete: {', '.join(missing)} missing",
                                 hint=f"delete {root}, then {INSTALL_HINT}")
    return kit


def install(version: str | None = None, sdist: Path | None = None, jobs: int | None = None,
            log=print) -> Toolkit:
    """Download the sdist (unless given), copy the converter out, build the tools; idempotent."""
    version = version or installed_version()
    try:
        kit = find(version)
        log(f"llama.cpp toolkit for llama-cpp-python {version} already installed: {kit.root}")
        return kit
    except RuntimeUnavailable:
        pass
    target = home() / f"llama-cpp-python-{version}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llamacpp-toolkit-", dir=target.parent) as tmp:
        work = Path(tmp)
        if sdist is None:
            log(f"downloading the {DISTRIBUTION} {version} sdist with pip")
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                            f"{DISTRIBUTION}=={version}", "-d", str(work / "dl")], check=True)
            sdist = next((work / "dl").glob("*.tar.gz"))
        digest = hashlib.sha256(Path(sdist).read_bytes()).hexdigest()
        log(f"extracting llama.cpp from {Path(sdist).name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(work / "src", filter="data")
        vendor = next((work / "src").glob("*/vendor/llama.cpp"))
        build = work / "build"
        jobs = jobs or os.cpu_count() or 2
        log(f"building {', '.join(TOOLS)} with cmake ({jobs} jobs; a few minutes)")
        started = time.time()
        subprocess.run(["cmake", "-S", str(vendor), "-B", str(build), *CMAKE_OPTIONS], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(jobs)], check=True,
                       stdout=subprocess.DEVNULL)
        publish(vendor, build / "bin", target, {"llama_cpp_python": version, "sdist": Path(sdist).name,
                                                "sdist_sha256": digest, "build_seconds": round(time.time() - started, 1)})
    log(f"installed {target}")
    return find(version)


def publish(vendor: Path, bin_dir: Path, target: Path, info: dict) -> None:
    """Copy the converter out of `vendor` and the tools out of `bin_dir` into a staging folder beside
    `target`, then rename it into place (toolkit.json last: a half-made toolkit is never found)."""
    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        for part in CONVERTER_PARTS:
            src = vendor / part
            if src.is_dir():
                shutil.copytree(src, stage / part, ignore=shutil.ignore_patterns("__pycache__", "tests"))
            elif src.is_file():
                shutil.copy2(src, stage / part)
        (stage / "bin").mkdir()
        for tool in TOOLS:
            shutil.copy2(bin_dir / tool, stage / "bin" / tool)
        info = {**info, "llama_cpp_build": _build_info(vendor), "tools": list(TOOLS)}
        (stage / "toolkit.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        os.replace(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _build_info(vendor: Path) -> str:
    """llama.cpp's release as the sdist names it (vendor/llama.cpp has no .git)."""
    for name in ("build-info.txt", "BUILD_NUMBER"):
        if (vendor / name).is_file():
            return (vendor / name).read_text().strip()
    return "vendored in the sdist"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.runtimes.llamacpp_tools")
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="download the llama-cpp-python sdist, copy the converter, build the tools")
    inst.add_argument("--sdist", type=Path, help="use this llama-cpp-python sdist instead of downloading it")
    inst.add_argument("--jobs", type=int, default=None)
    sub.add_parser("status", help="where the toolkit is, or why not")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            install(sdist=args.sdist, jobs=args.jobs)
        else:
            kit = find()
            print(json.dumps({"root": str(kit.root), **kit.info}, indent=1))
    except RuntimeUnavailable as error:
        print(f"error: {error.message}\n    hint: {error.hint}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as error:
        print(f"error: {' '.join(map(str, error.cmd[:4]))} ... failed (exit {error.returncode})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
