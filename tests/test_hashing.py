"""Content keys, file hashes, the stat cache and tree digests."""
from __future__ import annotations

import hashlib
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from engine.hashing import (
    StatCache,
    canonical_json,
    content_key,
    sha256_file,
    tree_digest,
    tree_manifest,
)

FIXED = {"b": [1, 2.5, None, True], "a": "é", "c": {"z": 0, "y": "x"}}


class CountingCache(StatCache):
    """Counts real hashing, to prove the cache answers unchanged files."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.hashed: list[str] = []

    def _hash_file(self, path: str) -> str:
        self.hashed.append(path)
        return super()._hash_file(path)


def _model_tree(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "model.safetensors").write_bytes(bytes(range(256)) * 10)
    (root / "sub" / "tokenizer.json").write_text("{}")
    return root


def test_canonical_json_is_pinned() -> None:
    assert canonical_json(FIXED) == '{"a":"é","b":[1,2.5,null,true],"c":{"y":"x","z":0}}'
    # Pinned: if this changes, every cache key in every registry changes.
    assert content_key(FIXED) == "d0372fee37587b1fe2b0d57597cab9bfb82da6ef07c47b9ee6a5520b112cce8f"
    assert len(content_key([])) == 64
    assert content_key({"x": 1, "y": 2}) == content_key({"y": 2, "x": 1})


def test_canonical_json_refuses_nan() -> None:
    with pytest.raises(ValueError):
        canonical_json({"x": math.nan})
    with pytest.raises(ValueError):
        content_key([math.inf])


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 123)  # crosses chunk boundaries
    path = tmp_path / "big.bin"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_stat_cache_hashes_once_then_rehashes_on_change(tmp_path: Path) -> None:
    path = tmp_path / "w.bin"
    path.write_bytes(b"a" * 1000)
    cache = CountingCache(tmp_path / "cache" / "stat.sqlite")
    first = cache.hash(path)
    assert first == hashlib.sha256(b"a" * 1000).hexdigest()
    assert cache.hash(path) == first
    assert len(cache.hashed) == 1

    # a second instance (another process) sees the stored row
    other = CountingCache(tmp_path / "cache" / "stat.sqlite")
    assert other.hash(path) == first and other.hashed == []
    rows = sqlite3.connect(tmp_path / "cache" / "stat.sqlite").execute("SELECT path, sha256 FROM files").fetchall()
    assert rows == [(os.path.realpath(path), first)]

    path.write_bytes(b"b" * 1000)  # same size, new content and mtime
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    second = cache.hash(path)
    assert second == hashlib.sha256(b"b" * 1000).hexdigest() != first
    assert len(cache.hashed) == 2
    assert sqlite3.connect(tmp_path / "cache" / "stat.sqlite").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    cache.close()
    other.close()


def test_stat_cache_follows_symlinks_to_one_row(tmp_path: Path) -> None:
    blob = tmp_path / "blob"
    blob.write_bytes(b"weights")
    (tmp_path / "l1").symlink_to(blob)
    (tmp_path / "l2").symlink_to(blob)
    cache = CountingCache(tmp_path / "stat.sqlite")
    assert cache.hash(tmp_path / "l1") == cache.hash(tmp_path / "l2") == sha256_file(blob)
    assert len(cache.hashed) == 1


def test_corrupt_stat_cache_is_recreated(tmp_path: Path) -> None:
    db = tmp_path / "stat.sqlite"
    db.write_bytes(b"this is not a sqlite database" * 100)
    path = tmp_path / "f"
    path.write_bytes(b"x")
    cache = CountingCache(db)
    assert cache.hash(path) == hashlib.sha256(b"x").hexdigest()
    assert cache.hash(path) == hashlib.sha256(b"x").hexdigest()
    assert len(cache.hashed) == 1  # the recreated cache works


def test_unusable_stat_cache_location_still_hashes(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("file where a folder should be")
    path = tmp_path / "f"
    path.write_bytes(b"y")
    cache = StatCache(blocker / "stat.sqlite")
    assert cache.hash(path) == hashlib.sha256(b"y").hexdigest()


def test_stat_cache_shared_by_two_processes(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"shared")
    db = tmp_path / "stat.sqlite"
    code = "import sys; from engine.hashing import StatCache; print(StatCache(sys.argv[1]).hash(sys.argv[2]))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(db), str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs == [hashlib.sha256(b"shared").hexdigest()] * 2


def test_tree_manifest_and_digest(tmp_path: Path) -> None:
    root = _model_tree(tmp_path / "m")
    cache = StatCache(tmp_path / "stat.sqlite")
    manifest = tree_manifest(root, cache)
    assert [e["path"] for e in manifest] == ["config.json", "model.safetensors", "sub/tokenizer.json"]
    assert manifest[1]["size"] == 2560
    assert manifest[1]["sha256"] == sha256_file(root / "model.safetensors")
    digest = tree_digest(manifest)
    assert digest == tree_digest(tree_manifest(root, None)) == content_key(manifest)

    # ignored: dot folders/files and unfinished downloads
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    (root / ".cache" / "huggingface").mkdir(parents=True)
    (root / ".cache" / "huggingface" / "x.lock").write_text("")
    (root / ".DS_Store").write_text("x")
    (root / "model.safetensors.incomplete").write_bytes(b"partial")
    assert tree_digest(tree_manifest(root, cache)) == digest

    # one byte changes the digest
    data = bytearray((root / "model.safetensors").read_bytes())
    data[100] ^= 1
    (root / "model.safetensors").write_bytes(bytes(data))
    assert tree_digest(tree_manifest(root, cache)) != digest


def test_tree_manifest_follows_file_symlinks_and_survives_loops(tmp_path: Path) -> None:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "abc").write_text('{"a": 1}')
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "config.json").symlink_to(Path("..") / "blobs" / "abc")
    (snap / "loop").symlink_to(snap, target_is_directory=True)
    (snap / "dangling").symlink_to(tmp_path / "nowhere")
    manifest = tree_manifest(snap, None)
    assert [e["path"] for e in manifest] == ["config.json"]
    assert manifest[0]["sha256"] == sha256_file(blobs / "abc")
