"""Environment faults end in one clear message naming the path, the README's exit code (never 70,
never a traceback), nothing registered and no good data touched; writability is checked before a
build, not after it. Real CLI subprocesses and real SQLite files; permissions are real (root runs
the CLI without DAC override), full and read-only disks are real tmpfs mounts (skipped where the
test may not mount)."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest
from toyplugin import make_model, run, toy_env, unprivileged, write_recipe

from engine.errors import BuildFailed
from engine.steps import StepPlan, run_step
from engine.store import Store

pytest.importorskip("safetensors")


@pytest.fixture()
def work(tmp_path: Path):
    """A registry in reg/ (one variant applied), the store in store/, a second recipe to build."""
    env = {**toy_env(tmp_path), "ENGINE_REGISTRY": str(tmp_path / "reg" / "registry.db"),
           "ENGINE_STORE": str(tmp_path / "store")}
    make_model(tmp_path / "model")
    make_model(tmp_path / "model2", seed=1)
    write_recipe(tmp_path / "one.yaml", "one")
    write_recipe(tmp_path / "two.yaml", "two", model="model2")
    assert run(tmp_path, env, "apply", "one.yaml").returncode == 0
    return tmp_path, env


def _artifacts(folder: Path, store: str = "store") -> list[str]:
    path = folder / store / "artifacts"
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def _clean(proc: subprocess.CompletedProcess, code: int) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr


@contextlib.contextmanager
def _mode(path: Path, mode: int):
    old = path.stat().st_mode & 0o777
    path.chmod(mode)
    try:
        yield
    finally:
        path.chmod(old)


@contextlib.contextmanager
def _tmpfs(where: Path, size: str, *options: str):
    where.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs to mount a tmpfs (root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(folder: Path) -> None:
    """Leave no free byte on the file system holding `folder`."""
    with contextlib.suppress(OSError), open(folder / "filler", "wb") as handle:
        while True:
            handle.write(b"\0" * 4096)
            handle.flush()


def test_reads_work_on_a_read_only_registry_folder(work):
    folder, env = work
    with _mode(folder / "reg", 0o555):
        for command in (("ls",), ("show", "one"), ("verify",), ("ls", "--json")):
            _clean(run(folder, env, *command, prefix=unprivileged()), 0)
        proc = run(folder, env, "apply", "two.yaml", prefix=unprivileged())
    _clean(proc, 1)
    assert str(folder / "reg" / "registry.db") in proc.stderr and "writable" in proc.stderr
    assert len(_artifacts(folder)) == 1  # refused before the build


def _made_by_an_older_engine(registry: Path) -> None:
    """The registry as an engine before m004 left it (no score summaries, m004 not recorded)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(registry)) as conn, conn:
        conn.execute("drop table score_summaries")
        conn.execute("delete from _sqlite_migrations where name = 'm004_score_summaries'")


def test_an_older_engines_registry_upgrades_when_listed(work):
    folder, env = work
    registry = folder / "reg" / "registry.db"
    _made_by_an_older_engine(registry)
    proc = run(folder, env, "ls")
    _clean(proc, 0)
    assert proc.stdout.splitlines()[1].startswith("one ")
    import sqlite3

    with contextlib.closing(sqlite3.connect(registry)) as conn:
        assert conn.execute("select count(*) from _sqlite_migrations where name = 'm004_score_summaries'"
                            ).fetchone() == (1,)


def test_an_older_engines_read_only_registry_gets_one_message(work):
    folder, env = work
    registry = folder / "reg" / "registry.db"
    _made_by_an_older_engine(registry)
    with _mode(folder / "reg", 0o555), _mode(registry, 0o444):
        proc = run(folder, env, "ls", prefix=unprivileged())
    _clean(proc, 1)
    assert f"{registry} was made by an older engine" in proc.stderr and "write access" in proc.stderr


def test_a_read_only_registry_file_is_refused_before_the_build(work):
    folder, env = work
    registry = folder / "reg" / "registry.db"
    with _mode(registry, 0o444):
        proc = run(folder, env, "apply", "two.yaml", prefix=unprivileged())
    _clean(proc, 1)
    assert f"cannot open or write the registry {registry}" in proc.stderr
    assert len(_artifacts(folder)) == 1
    assert [p.name for p in (folder / "reg").iterdir() if not p.stat().st_mode & 0o200] == []  # no -wal/-shm left 0444
    _clean(run(folder, env, "apply", "two.yaml"), 0)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_registry_is_named(work, damage):
    folder, env = work
    registry = folder / "reg" / "registry.db"
    if damage == "garbage":
        registry.write_bytes(b"this is not sqlite\n" * 200)
    else:
        data = registry.read_bytes()
        registry.write_bytes(data[: len(data) // 3])
        for suffix in ("-wal", "-shm"):
            Path(str(registry) + suffix).unlink(missing_ok=True)
    for command in (("ls",), ("show", "one"), ("verify",), ("apply", "two.yaml"), ("gc",)):
        proc = run(folder, env, *command)
        _clean(proc, 1)
        assert str(registry) in proc.stderr, proc.stderr
    assert len(_artifacts(folder)) == 1  # nothing built, nothing collected


def test_an_unwritable_store_is_refused_before_the_build(work):
    folder, env = work
    with _mode(folder / "store", 0o555), _mode(folder / "store" / "artifacts", 0o555):
        proc = run(folder, env, "apply", "two.yaml", prefix=unprivileged())
        cached = run(folder, env, "apply", "one.yaml", prefix=unprivileged())
    _clean(proc, 1)
    assert "cannot write the store" in proc.stderr and str(folder / "store") in proc.stderr
    _clean(cached, 0)  # everything cached: nothing to write to the store
    assert "up to date" in cached.stdout


def test_a_read_only_store_mount(work):
    folder, env = work
    with _tmpfs(folder / "rostore", "1m") as mount:
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        proc = run(folder, {**env, "ENGINE_STORE": str(mount)}, "apply", "two.yaml")
    _clean(proc, 1)
    assert "cannot write the store" in proc.stderr and "Read-only file system" in proc.stderr
    assert "two" not in run(folder, env, "ls").stdout


def test_a_full_disk_under_the_store(work):
    folder, env = work
    with _tmpfs(folder / "fullstore", "256k") as mount:
        _fill(mount)
        proc = run(folder, {**env, "ENGINE_STORE": str(mount)}, "apply", "two.yaml")
    _clean(proc, 1)
    assert "disk is full" in proc.stderr or "No space left" in proc.stderr, proc.stderr
    assert "two" not in run(folder, env, "ls").stdout
    _clean(run(folder, env, "verify"), 0)


def test_a_full_disk_under_the_registry(work):
    folder, env = work
    with _tmpfs(folder / "fullreg", "256k") as mount:
        first = run(folder, {**env, "ENGINE_REGISTRY": str(mount / "registry.db")}, "apply", "one.yaml")
        _clean(first, 0)
        _fill(mount)
        proc = run(folder, {**env, "ENGINE_REGISTRY": str(mount / "registry.db")}, "apply", "two.yaml")
        _clean(proc, 1)
        assert str(mount / "registry.db") in proc.stderr
        listed = run(folder, {**env, "ENGINE_REGISTRY": str(mount / "registry.db")}, "ls")
        assert "one" in listed.stdout and "two" not in listed.stdout


def test_a_failed_copy_of_the_logs_does_not_hide_the_build_error(tmp_path):
    store = Store(tmp_path / "store")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "failed").write_text("a file where the failed/ folder goes")
    step = StepPlan("build", "k" * 64, {}, {}, "missing", "toy")

    def work(stage):
        (stage.logs_dir / "build.log").write_text("the real reason")
        raise BuildFailed("the builder failed: see its log")

    with pytest.raises(BuildFailed) as caught:
        run_step(store, step, work, [])
    assert caught.value.message == "the builder failed: see its log"
    assert "not kept" in caught.value.hint and str(tmp_path / "store" / "failed") in caught.value.hint
