"""Content keys and file hashes.

Every cache decision in the engine rests on these keys, so they are full sha256 hex digests of a
canonical JSON text (never truncated), and hashing multi-GB weights is done once per file version
thanks to a small stat cache.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sqlite3
import stat
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

CHUNK_SIZE = 1 << 20  # 1 MiB
DEFAULT_IGNORE: tuple[str, ...] = (".*", "*.incomplete")


def canonical_json(obj: Any) -> str:
    """One text per value: sorted keys, no whitespace, raw unicode; NaN/Infinity are refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def content_key(obj: Any) -> str:
    """Full sha256 hex of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file, read in 1 MiB chunks so memory stays flat for huge weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            digest.update(chunk)
            if _digesting is not None:
                _digesting.advance(len(chunk))
    return digest.hexdigest()


#: the progress task of the tree being digested (engine.progress), counting bytes as they are read
_digesting = None


_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS files ("
    " path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
    " inode INTEGER NOT NULL, sha256 TEXT NOT NULL)"
)


class StatCache:
    """sqlite map (real path, size, mtime_ns, inode) -> sha256, so unchanged files are hashed once.

    The cache is only an accelerator: a corrupt or unreadable database is recreated, and if even
    that fails every call simply hashes the file. Safe for several processes (WAL, busy timeout).
    """

    def __init__(self, db_path: str | os.PathLike[str], timeout: float = 30.0) -> None:
        self.db_path = Path(db_path)
        self.timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._disabled = False
        self._lock = threading.Lock()

    # -- connection -------------------------------------------------------------------------
    def _open(self) -> sqlite3.Connection:
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.db_path, timeout=self.timeout, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(_SCHEMA)
            conn.execute("SELECT path, size, mtime_ns, inode, sha256 FROM files LIMIT 1").fetchall()
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is not None or self._disabled:
            return self._conn
        try:
            self._conn = self._open()
        except (sqlite3.Error, OSError):
            self._reset_file()
            try:
                self._conn = self._open()
            except (sqlite3.Error, OSError):
                self._disabled = True  # e.g. read-only folder: hash without a cache
        return self._conn

    def _reset_file(self) -> None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                Path(str(self.db_path) + suffix).unlink()
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> StatCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- lookups ----------------------------------------------------------------------------
    def _lookup(self, key: str, st: os.stat_result) -> str | None:
        with self._lock:
            conn = self._connection()
            if conn is None:
                return None
            try:
                row = conn.execute(
                    "SELECT sha256 FROM files WHERE path = ? AND size = ? AND mtime_ns = ? AND inode = ?",
                    (key, st.st_size, st.st_mtime_ns, st.st_ino),
                ).fetchone()
            except sqlite3.Error:
                return None
        return row[0] if row else None

    def _store(self, key: str, st: os.stat_result, sha: str) -> None:
        with self._lock:
            conn = self._connection()
            if conn is None:
                return
            try:
                with conn:
                    conn.execute(
                        "INSERT OR REPLACE INTO files (path, size, mtime_ns, inode, sha256)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (key, st.st_size, st.st_mtime_ns, st.st_ino, sha),
                    )
            except sqlite3.Error:
                pass  # a cache that cannot be written only costs a re-hash later

    def _hash_file(self, path: str) -> str:
        """Hash one file; a separate method so tests can count real hashing."""
        return sha256_file(path)

    def hash(self, path: str | os.PathLike[str]) -> str:
        """sha256 of ``path`` (symlinks followed), from the cache when the file is unchanged."""
        real = os.path.realpath(path)
        before = os.stat(real)
        cached = self._lookup(real, before)
        if cached is not None:
            return cached
        sha = self._hash_file(real)
        after = os.stat(real)
        if (before.st_size, before.st_mtime_ns, before.st_ino) == (
            after.st_size,
            after.st_mtime_ns,
            after.st_ino,
        ):  # not modified while we read it
            self._store(real, after, sha)
        return sha


def _ignored(name: str, ignore: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in ignore)


def tree_manifest(
    root: str | os.PathLike[str],
    cache: StatCache | None = None,
    ignore: Iterable[str] = DEFAULT_IGNORE,
    *,
    confined_to: Sequence[str | os.PathLike[str]] | None = None,
) -> list[dict[str, Any]]:
    """[{path, size, sha256}] for every regular file under ``root``, sorted by posix path.

    Symlinks are followed (hub snapshots are symlinks to blobs); names matching ``ignore``
    (dot-files and dot-folders such as .git/.cache, ``*.incomplete`` downloads) are skipped, and so
    are broken links. Directory symlink loops are visited once. With ``confined_to`` (a source
    folder), a link must lead inside one of those folders and every file must be a regular one:
    otherwise SourceRefused, before anything is read (a link to /proc would block, to /usr hash GBs).
    """
    global _digesting
    from .progress import task

    outer, _digesting = _digesting, task("digesting", unit="B")
    try:
        with _digesting:
            return _tree_manifest(Path(root), cache, ignore, confined_to)
    finally:
        _digesting = outer


def _tree_manifest(root_path: Path, cache: StatCache | None, ignore: Iterable[str],
                   confined_to: Sequence[str | os.PathLike[str]] | None) -> list[dict[str, Any]]:
    patterns = tuple(ignore)
    allowed = None if confined_to is None else [os.path.realpath(p) for p in confined_to]
    entries: list[dict[str, Any]] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root_path, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real_dir)
        dirnames[:] = sorted(d for d in dirnames if not _ignored(d, patterns))
        if allowed is not None:
            for name in dirnames:
                _check_confined(os.path.join(dirpath, name), allowed)
        for name in filenames:
            if _ignored(name, patterns):
                continue
            full = os.path.join(dirpath, name)
            if allowed is not None:
                _check_confined(full, allowed)
            if not os.path.isfile(full):  # broken link, fifo, socket, ...
                continue
            sha = cache.hash(full) if cache is not None else sha256_file(full)
            rel = Path(full).relative_to(root_path).as_posix()
            entries.append({"path": rel, "size": os.stat(full).st_size, "sha256": sha})
    entries.sort(key=lambda entry: entry["path"])
    return entries


def _check_confined(path: str, allowed: list[str]) -> None:
    """A link must lead inside an allowed folder; a file must be regular (a fifo or device blocks)."""
    from .errors import SourceRefused

    hint = "copy what it points to into the folder, or point source.path at the folder that holds it"
    if os.path.islink(path):
        target = os.path.realpath(path)
        if not any(target == a or target.startswith(a.rstrip(os.sep) + os.sep) for a in allowed):
            raise SourceRefused(f"{path} is a link that leads outside the source folder (to {target}); a source "
                                "folder may hold regular files and links that stay inside it", hint=hint)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a broken link: skipped like before
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise SourceRefused(f"{path} is not a regular file (a fifo, socket or device); a source folder may hold "
                            "regular files and links that stay inside it", hint="remove it from the folder")


def tree_digest(manifest: list[dict[str, Any]]) -> str:
    """The content key of a manifest: one sha256 naming the whole folder's bytes."""
    return content_key(manifest)
