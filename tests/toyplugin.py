"""The toy runtime (tests/plugins) made visible to a real CLI subprocess, plus small local models:
the fastest real apply there is (numpy only), for tests about the store, the registry and faults."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

PLUGINS = Path(__file__).resolve().parent / "plugins"


def toy_env(tmp_path: Path) -> dict:
    """An environment whose PYTHONPATH declares the toy runtime's entry point."""
    site = tmp_path / "site"
    dist = site / "toy_engine_runtime-0.1.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-engine-runtime\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[engine.runtimes]\ntoy = toy_runtime:ToyRuntime\n")
    path = os.pathsep.join([str(PLUGINS), str(site), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "ENGINE_DEBUG": ""}


def make_model(folder: Path, seed: int = 0) -> Path:
    """A two-matrix safetensors model with a config.json."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    save_file({"a.weight": rng.standard_normal((4, 8)).astype(np.float32),
               "b.weight": rng.standard_normal((2, 8)).astype(np.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "toy", "max_position_embeddings": 128}')
    return folder


def write_recipe(path: Path, name: str, model: str = "model", extra: str = "") -> Path:
    path.write_text(f"name: {name}\nsource: {{path: {model}}}\n"
                    f"quantization: {{weight_dtype: int8, group_size: -1}}\ntarget: {{runtime: toy}}\n{extra}")
    return path


def run(cwd: Path, env: dict, *args: str, prefix: tuple[str, ...] = (), timeout: float = 300
        ) -> subprocess.CompletedProcess:
    """`python -m engine ARGS` (optionally under a wrapper such as setpriv), output captured."""
    return subprocess.run([*prefix, sys.executable, "-m", "engine", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def start(cwd: Path, env: dict, *args: str) -> subprocess.Popen:
    """The CLI started in the background (for a build paused by TOY_PAUSE)."""
    return subprocess.Popen([sys.executable, "-m", "engine", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions apply even to root (no DAC override)."""
    if os.geteuid() != 0:
        return ()
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-all")
