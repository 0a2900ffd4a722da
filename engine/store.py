"""Content-addressed artifact store: nothing half-written ever looks complete.

Layout (pinned by tests/test_store.py)::

    <root>/
      artifacts/<key>/manifest.json   # written last inside staging; present => entry complete
      artifacts/<key>/files/...       # the payload a runtime loads
      artifacts/<key>/logs/...        # build logs (not hashed, not part of the payload)
      staging/<key>.<pid>.<token>/    # a build in progress; never read by anyone else (token: host+random)
      trash/                          # entries being replaced or removed
      locks/<key>.lock                # one builder per key at a time (flock)
      locks/gc.lock                   # every apply holds it shared, gc exclusive: never both
      registries/<sha256 of path>     # one line: a registry that uses this store (gc reads them all);
                                      # relative to <root> when it lies beside the store
      state.db                        # stat cache: (path, size, mtime_ns, inode) -> sha256

A build writes into its own staging folder; `commit` hashes the payload, writes the manifest and
renames the folder into `artifacts/` in one `os.replace`. A crash or `kill -9` at any point leaves
either no entry or a complete one; stale staging folders are swept by the next run.

Several registries may share one store. Each apply and gc writes its registry's path under
`registries/`, so gc keeps every entry any of them references; and gc cannot run while an apply
holds `locks/gc.lock`, so it never deletes work that is not registered yet.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import StoreBusy
from .filelock import exclusive
from .hashing import StatCache, content_key, tree_manifest

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Entry:
    """A committed store entry."""

    key: str
    root: Path
    manifest: dict

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.manifest["files"])


@dataclass(frozen=True)
class Staging:
    """A private folder a step writes into before it is committed."""

    key: str
    root: Path

    @property
    def files_dir(self) -> Path:
        return self.root / "files"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"


class Store:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()

    # -- paths ---------------------------------------------------------------------------------
    def _dir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def entry_path(self, key: str) -> Path:
        return self.root / "artifacts" / key

    def stat_cache(self) -> StatCache:
        self.root.mkdir(parents=True, exist_ok=True)
        return StatCache(self.root / "state.db")

    # -- reading -------------------------------------------------------------------------------
    def get(self, key: str) -> Entry | None:
        """The committed entry for `key`, or None. A corrupt manifest is a miss, not an error."""
        root = self.entry_path(key)
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            return None
        return Entry(key, root, manifest)

    def keys(self) -> list[str]:
        folder = self.root / "artifacts"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def registries(self) -> list[Path]:
        """The registries that said they use this store (gc must keep what any of them uses)."""
        folder = self.root / "registries"
        if not folder.is_dir():
            return []
        texts = [p.read_text(encoding="utf-8").strip() for p in folder.iterdir() if not p.name.endswith(".tmp")]
        return sorted(Path(t) if os.path.isabs(t) else (self.root / t).resolve() for t in texts)

    def _recorded(self, registry: Path) -> str:
        """How a registry is written in the list: relative to the store when it lies in the folder
        that holds the store (the default layout), so the two can be moved or copied together."""
        root, registry = self.root.resolve(), registry.resolve()
        return os.path.relpath(registry, root) if registry.is_relative_to(root.parent) else str(registry)

    # -- writing -------------------------------------------------------------------------------
    def attach(self, registry: Path) -> None:
        """Record that `registry` uses this store (idempotent; written atomically)."""
        recorded = self._recorded(registry)
        path = self._dir("registries") / content_key(recorded)
        if path.is_file():
            return
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        _write_durably(tmp, f"{recorded}\n")
        os.replace(tmp, path)

    def forget(self, registry: Path) -> bool:
        """Drop a registry from the list (it was deleted on purpose); True when it was listed."""
        path = self.root / "registries" / content_key(self._recorded(registry))
        if not path.is_file():
            return False
        path.unlink()
        return True

    @contextlib.contextmanager
    def applying(self) -> Iterator[None]:
        """Held (shared) for a whole apply: gc waits for no apply, it refuses while one runs."""
        with open(self._dir("locks") / "gc.lock", "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH)
            yield

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Held (exclusive) by gc; StoreBusy at once when an apply is in progress."""
        with open(self._dir("locks") / "gc.lock", "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(f"an apply is in progress on the store {self.root}; gc deletes nothing now",
                                hint="run `engine gc` again when the apply has ended") from None
            yield

    def check_idle(self) -> None:
        """StoreBusy when an apply holds the store; creates nothing (the store may not exist)."""
        if (self.root / "locks" / "gc.lock").is_file():
            with self.collecting():
                pass

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the build lock for `key`; a second process waits here, then finds the entry."""
        with exclusive(self._dir("locks") / f"{key}.lock"):
            yield

    @contextlib.contextmanager
    def staging(self, key: str) -> Iterator[Staging]:
        """A fresh private folder; removed on the way out unless it was committed."""
        self.sweep_staging()
        root = self._dir("staging") / f"{key}.{os.getpid()}.{_HOST}{secrets.token_hex(4)}"
        stage = Staging(key, root)
        stage.files_dir.mkdir(parents=True)
        stage.logs_dir.mkdir()
        try:
            yield stage
        finally:
            shutil.rmtree(root, ignore_errors=True)

    def commit(self, stage: Staging, kind: str, meta: dict) -> Entry:
        """Hash the payload, write the manifest, and publish the entry with one rename."""
        files = tree_manifest(stage.files_dir, None)
        manifest = {
            "format": MANIFEST_FORMAT,
            "key": stage.key,
            "kind": kind,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "meta": meta,
            "files": files,
        }
        _write_durably(stage.root / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
        target = self.entry_path(stage.key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # --force: move the old entry aside, then swap the new one in
            self._discard(target)
        os.replace(stage.root, target)
        _fsync_dir(target.parent)
        return Entry(stage.key, target, manifest)

    def remove(self, key: str) -> bool:
        target = self.entry_path(key)
        if not target.exists():
            return False
        self._discard(target)
        return True

    def _discard(self, path: Path) -> None:
        trash = self._dir("trash") / f"{path.name}.{secrets.token_hex(4)}"
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def sweep_staging(self) -> list[Path]:
        """Remove staging folders whose owning process is gone (left by a crash or kill -9)."""
        removed = []
        folder = self.root / "staging"
        if not folder.is_dir():
            return removed
        for path in folder.iterdir():
            if not _this_host(path.name):  # another node's build on a shared store: its pid means nothing here
                continue
            pid = _owner_pid(path.name)
            if pid is None or not _alive(pid):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
        shutil.rmtree(self.root / "trash", ignore_errors=True)
        return removed


#: this machine in a staging folder's name (`<key>.<pid>.<host tag><random>`): nodes sharing one store
#: over a network filesystem sweep only their own dead builds' folders (a pid is only valid on its host)
_HOST = content_key(socket.gethostname())[:8]


def _this_host(name: str) -> bool:
    token = name.rsplit(".", 1)[-1]
    return len(token) != 16 or token[:8] == _HOST  # the older 8-character token: written on this host


def _owner_pid(name: str) -> int | None:
    parts = name.rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
