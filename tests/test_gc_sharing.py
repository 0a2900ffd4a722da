"""engine gc deletes only what nobody uses: not another registry's artifacts on a shared store, not
the work of an apply in progress, and nothing at all when its own registry does not exist.
Real CLI subprocesses, real SQLite files, the toy runtime (fast)."""
from __future__ import annotations

from pathlib import Path

import pytest
from toyplugin import make_model, run, start, toy_env, wait_for, write_recipe

pytest.importorskip("safetensors")


@pytest.fixture()
def shared(tmp_path: Path):
    """Two registries (a/, b/) on one store, each with one applied variant."""
    env = {**toy_env(tmp_path), "ENGINE_STORE": str(tmp_path / "store")}
    make_model(tmp_path / "model", seed=0)
    make_model(tmp_path / "model2", seed=1)
    write_recipe(tmp_path / "one.yaml", "one")
    write_recipe(tmp_path / "two.yaml", "two", model="model2")
    for reg, recipe in (("a", "one.yaml"), ("b", "two.yaml")):
        proc = run(tmp_path, env, "--registry", f"{reg}/registry.db", "apply", recipe)
        assert proc.returncode == 0, proc.stderr
    return tmp_path, env


def test_gc_keeps_the_artifacts_of_another_registry(shared):
    folder, env = shared
    proc = run(folder, env, "--registry", "a/registry.db", "gc")
    assert proc.returncode == 0, proc.stderr
    assert "deleted" not in proc.stdout
    for reg in ("a", "b"):
        check = run(folder, env, "--registry", f"{reg}/registry.db", "verify")
        assert check.returncode == 0, check.stdout + check.stderr


def test_gc_frees_what_no_registry_uses(shared):
    folder, env = shared
    assert run(folder, env, "--registry", "b/registry.db", "rm", "two").returncode == 0
    proc = run(folder, env, "--registry", "a/registry.db", "gc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("deleted") == 1  # two's build; one's stays
    assert run(folder, env, "--registry", "a/registry.db", "verify").returncode == 0


def test_gc_refuses_when_its_registry_does_not_exist(shared):
    folder, env = shared
    store = folder / "store" / "artifacts"
    before = sorted(p.name for p in store.iterdir())
    proc = run(folder, env, "--registry", "typo/registry.db", "gc")
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "no registry at" in proc.stderr and "typo" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in store.iterdir()) == before


def test_gc_refuses_when_a_registry_sharing_the_store_is_gone(shared):
    folder, env = shared
    (folder / "b" / "registry.db").rename(folder / "b" / "moved.db")
    proc = run(folder, env, "--registry", "a/registry.db", "gc")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(folder / "b" / "registry.db") in proc.stderr and "forget" in proc.stderr
    (folder / "b" / "moved.db").rename(folder / "b" / "registry.db")
    assert run(folder, env, "--registry", "b/registry.db", "verify").returncode == 0


def test_gc_forget_drops_a_deleted_registry(shared):
    folder, env = shared
    gone = folder / "b" / "registry.db"
    gone.unlink()
    proc = run(folder, env, "--registry", "a/registry.db", "gc", "--forget", str(gone))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("deleted") == 1
    assert run(folder, env, "--registry", "a/registry.db", "verify").returncode == 0


def test_gc_never_touches_an_apply_in_progress(tmp_path: Path):
    env = toy_env(tmp_path)
    make_model(tmp_path / "model")
    write_recipe(tmp_path / "one.yaml", "one")
    gate = tmp_path / "gate"
    applying = start(tmp_path, {**env, "TOY_PAUSE": str(gate)}, "apply", "one.yaml")
    try:
        wait_for(Path(str(gate) + ".started"))
        proc = run(tmp_path, env, "gc")
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "apply is in progress" in proc.stderr and "Traceback" not in proc.stderr
        dry = run(tmp_path, env, "gc", "--dry-run")
        assert "deleted" not in dry.stdout
    finally:
        gate.touch()
        out, err = applying.communicate(timeout=120)
    assert applying.returncode == 0, err
    assert run(tmp_path, env, "verify").returncode == 0
    assert "up to date" in run(tmp_path, env, "apply", "one.yaml").stdout


def test_a_project_folder_moved_whole_still_collects(tmp_path: Path):
    """registry.db beside its .engine/ store is recorded relative to the store: moving the pair
    neither makes gc refuse (the old path is gone) nor keeps entries for the old place."""
    env = toy_env(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    make_model(project / "model")
    write_recipe(project / "one.yaml", "one")
    assert run(project, env, "apply", "one.yaml").returncode == 0
    moved = tmp_path / "moved"
    project.rename(moved)
    assert run(moved, env, "rm", "one").returncode == 0
    proc = run(moved, env, "gc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("deleted") == 1
