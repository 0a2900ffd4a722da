"""Build a Hugging Face hub cache by hand, the way huggingface_hub lays it out on disk:
<cache>/models--ORG--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>, refs/<name>}."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def write_snapshot(repo_dir: Path, commit: str, files: dict[str, bytes], ref: str | None = None) -> Path:
    """Content-addressed blobs plus relative symlinks; optionally point refs/<ref> at the commit."""
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        (blobs / sha).write_bytes(data)
        link = repo_dir / "snapshots" / commit / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blobs / sha, link.parent))
    if ref:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return repo_dir / "snapshots" / commit
