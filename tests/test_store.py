"""The store's on-disk layout and its all-or-nothing commit (see engine/store.py docstring)."""
import json
import os
import subprocess
import sys

from engine.store import Store


def _build(store: Store, key: str, payload: dict[str, bytes]):
    with store.lock(key), store.staging(key) as stage:
        for name, data in payload.items():
            path = stage.files_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        (stage.logs_dir / "build.log").write_text("log")
        return store.commit(stage, "build", {"note": "x"})


def test_layout_is_pinned(tmp_path):
    store = Store(tmp_path / "st")
    entry = _build(store, "k" * 64, {"model.onnx": b"abc", "sub/x.json": b"{}"})
    root = tmp_path / "st" / "artifacts" / ("k" * 64)
    assert entry.root == root
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()) == [
        "files/model.onnx", "files/sub/x.json", "logs/build.log", "manifest.json"]
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["key"] == "k" * 64 and manifest["kind"] == "build" and manifest["format"] == 1
    assert [f["path"] for f in manifest["files"]] == ["model.onnx", "sub/x.json"]  # logs are not payload
    assert manifest["files"][0] == {
        "path": "model.onnx", "size": 3,
        "sha256": "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    assert not any((tmp_path / "st" / "staging").iterdir())  # staging emptied by the rename
    assert store.get("k" * 64).size == 5


def test_failed_build_leaves_nothing(tmp_path):
    store = Store(tmp_path / "st")
    try:
        with store.staging("a" * 64) as stage:
            (stage.files_dir / "half.bin").write_bytes(b"half")
            raise RuntimeError("builder crashed")
    except RuntimeError:
        pass
    assert store.get("a" * 64) is None
    assert not any((tmp_path / "st" / "staging").iterdir())


def test_corrupt_or_foreign_manifest_is_a_miss(tmp_path):
    store = Store(tmp_path / "st")
    _build(store, "b" * 64, {"x": b"1"})
    manifest = tmp_path / "st" / "artifacts" / ("b" * 64) / "manifest.json"
    manifest.write_text("{not json")
    assert store.get("b" * 64) is None
    manifest.write_text(json.dumps({"key": "c" * 64, "files": []}))
    assert store.get("b" * 64) is None


def test_force_rebuild_replaces_the_entry(tmp_path):
    store = Store(tmp_path / "st")
    _build(store, "d" * 64, {"x": b"old"})
    entry = _build(store, "d" * 64, {"x": b"new"})
    assert (entry.files_dir / "x").read_bytes() == b"new"
    assert store.keys() == ["d" * 64]


def test_stale_staging_of_a_dead_process_is_swept(tmp_path):
    store = Store(tmp_path / "st")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / "st" / "staging" / f"{'e' * 64}.{dead}.abcd"
    (stale / "files").mkdir(parents=True)
    live = tmp_path / "st" / "staging" / f"{'f' * 64}.{os.getppid()}.abcd"
    live.mkdir()
    removed = store.sweep_staging()
    assert stale in removed and not stale.exists()
    assert live.exists()  # its owner is alive: not ours to delete
