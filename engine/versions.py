"""Installed versions of distributions, read without importing them (they enter cache keys)."""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable
from functools import lru_cache
from importlib import metadata

from .errors import RuntimeUnavailable

#: how a plan asks for a distribution's version; tests pass a fixed table to pin keys
VersionLookup = Callable[[str], str]


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@lru_cache(maxsize=1)
def _dist_info_versions() -> dict[str, str]:
    """name -> version from the *.dist-info folder names on sys.path: one listing per folder,
    where importlib.metadata.version() walks sys.path again for every name (a cached apply asks
    for about ten)."""
    found: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                dist, _, version = name[: -len(".dist-info")].partition("-")
                found.setdefault(_normalize(dist), version)
    return found


def installed_version(dist: str) -> str:
    """The installed version of a distribution; PackageNotFoundError when it is absent."""
    version = _dist_info_versions().get(_normalize(dist))
    return version if version else metadata.version(dist)


def versions_of(dists: Iterable[str], lookup: VersionLookup = installed_version, *, needed_by: str,
                extra: str = "all") -> dict[str, str]:
    """{dist: version} for each distribution; RuntimeUnavailable naming the pip extra when one is absent."""
    versions = {}
    for dist in dists:
        try:
            versions[dist] = lookup(dist)
        except metadata.PackageNotFoundError:
            raise RuntimeUnavailable(
                f"{needed_by} needs the Python package '{dist}', which is not installed",
                hint=f"pip install 'engine[{extra}]'",
            ) from None
    return versions


def optional_versions(dists: Iterable[str], lookup: VersionLookup = installed_version) -> dict[str, str]:
    """{dist: version} for the distributions that are installed; absent ones are left out."""
    out = {}
    for dist in dists:
        try:
            out[dist] = lookup(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
