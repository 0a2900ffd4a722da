"""An artifact is regular files only, and verify says so: a link (to a folder, or to an identical
copy outside the store) or an unreadable file fails verification (exit 4) naming the path."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from toyplugin import make_model, run, toy_env, unprivileged, write_recipe

pytest.importorskip("safetensors")


@pytest.fixture()
def applied(tmp_path: Path):
    env = toy_env(tmp_path)
    make_model(tmp_path / "model")
    write_recipe(tmp_path / "one.yaml", "one")
    assert run(tmp_path, env, "apply", "one.yaml").returncode == 0
    files = next((tmp_path / ".engine" / "artifacts").glob("*/files/weights.npz")).parent
    return tmp_path, env, files


def test_a_folder_link_added_inside_an_artifact_fails(applied):
    folder, env, files = applied
    os.symlink(folder / "model", files / "extra")
    proc = run(folder, env, "verify")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert f"not a regular file (a link): {files / 'extra'}" in proc.stderr


def test_a_file_replaced_by_a_link_to_an_identical_copy_fails(applied):
    folder, env, files = applied
    copy = folder / "copy.npz"
    shutil.copy2(files / "weights.npz", copy)
    (files / "weights.npz").unlink()
    os.symlink(copy, files / "weights.npz")
    proc = run(folder, env, "verify")
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert f"not a regular file (a link): {files / 'weights.npz'}" in proc.stderr


def test_an_unreadable_artifact_file_fails_naming_it(applied):
    folder, env, files = applied
    (files / "weights.npz").chmod(0)
    try:
        proc = run(folder, env, "verify", prefix=unprivileged())
    finally:
        (files / "weights.npz").chmod(0o644)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert f"unreadable (Permission denied): {files / 'weights.npz'}" in proc.stderr
    assert "Traceback" not in proc.stderr
