"""A source folder cannot poison the cache: a change during a build is refused, and a folder holds
only regular files and links that stay inside it. Real CLI, toy runtime (fast)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from toyplugin import make_model, run, start, toy_env, wait_for, write_recipe

pytest.importorskip("safetensors")


@pytest.fixture()
def work(tmp_path: Path):
    env = toy_env(tmp_path)
    make_model(tmp_path / "model")
    write_recipe(tmp_path / "one.yaml", "one")
    return tmp_path, env


def test_a_source_changed_during_the_build_is_not_committed(work):
    folder, env = work
    gate = folder / "gate"
    applying = start(folder, {**env, "TOY_PAUSE": str(gate)}, "apply", "one.yaml")
    try:
        wait_for(Path(str(gate) + ".started"))
        make_model(folder / "model", seed=7)  # new bytes under the digest the plan computed
    finally:
        gate.touch()
        _, err = applying.communicate(timeout=120)
    assert applying.returncode == 1, err
    assert "changed while it was being read" in err and str(folder / "model") in err
    assert "Traceback" not in err
    assert run(folder, env, "ls").stdout.strip() == ""  # nothing registered
    artifacts = folder / ".engine" / "artifacts"
    assert not artifacts.is_dir() or not any(artifacts.iterdir())  # nothing committed
    again = run(folder, env, "apply", "one.yaml")
    assert again.returncode == 0 and "built" in again.stdout, again.stderr
    assert run(folder, env, "verify").returncode == 0


@pytest.mark.parametrize("target", ["/proc", "/usr", "/etc/hostname"])
def test_a_link_leading_outside_the_source_folder_is_refused(work, target):
    folder, env = work
    os.symlink(target, folder / "model" / "outside")
    proc = run(folder, env, "apply", "--dry-run", "one.yaml", timeout=30)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "outside the source folder" in proc.stderr and str(folder / "model" / "outside") in proc.stderr
    assert "Traceback" not in proc.stderr
    state = folder / ".engine" / "state.db"
    if state.exists():  # nothing outside was hashed into the stat cache
        import sqlite3

        paths = [r[0] for r in sqlite3.connect(state).execute("select path from files")]
        assert all(p.startswith(str(folder / "model")) for p in paths), paths


def test_links_inside_the_source_folder_are_fine(work):
    folder, env = work
    (folder / "model" / "sub").mkdir()
    os.symlink("../config.json", folder / "model" / "sub" / "config.json")
    os.symlink("sub", folder / "model" / "alias")
    proc = run(folder, env, "apply", "one.yaml")
    assert proc.returncode == 0, proc.stderr


def test_a_fifo_in_the_source_folder_is_refused(work):
    folder, env = work
    os.mkfifo(folder / "model" / "pipe")
    proc = run(folder, env, "apply", "--dry-run", "one.yaml", timeout=30)
    assert proc.returncode == 1 and "not a regular file" in proc.stderr, proc.stderr
