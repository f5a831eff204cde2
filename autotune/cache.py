"""Content-hash keys and atomic writes for everything autotune builds.

A trained adapter is keyed by (base model, data split, training choices); an export by
(adapter key, export choices). Every key also holds :data:`SCHEMA_VERSION`, the version
of the autotune code that builds the artifact and the versions of the libraries that
shape it (:func:`library_versions`), so an upgrade never serves a stale artifact.
An artifact is written into a temporary sibling folder and renamed into place only when
complete, so a crash or ``kill -9`` never leaves a half-written folder that a later run
would trust. :func:`file_lock` keeps two workers from building the same artifact at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_TMP_MARK = ".tmp-"
# Bump when the layout or the meaning of a cached artifact changes: every key changes with it.
SCHEMA_VERSION = 2
# One module, several wheels (CPU, CUDA, DirectML builds): the first one installed counts.
_DISTRIBUTIONS = {
    "onnxruntime-genai": ("onnxruntime-genai", "onnxruntime-genai-cuda", "onnxruntime-genai-directml"),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml"),
}


def cache_root() -> Path:
    """The user cache folder (``$AUTOTUNE_CACHE`` or the platform's cache dir)."""
    env = os.environ.get("AUTOTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("autotune"))


def content_key(*parts: Any) -> str:
    """A short stable hash of dataclasses, dicts, strings and numbers."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    text = json.dumps([plain(p) for p in parts], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def whole_floats(spec: Any) -> None:
    """Make the whole numbers a frozen dataclass holds in its ``float`` fields floats, in place (for a
    ``__post_init__``): alpha 16 and 16.0 are one choice, and must be one :func:`content_key` (JSON writes them
    apart). Floats are left as they are, so the keys of specs built from floats do not change."""
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if f.type in ("float", float) and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(spec, f.name, float(value))


@functools.lru_cache(maxsize=None)
def library_version(name: str) -> str | None:
    """The installed version of package ``name`` (any of its build variants), None if absent."""
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def library_versions(*names: str) -> dict[str, str | None]:
    """``{name: version}`` for a cache key: a changed version is a changed key."""
    return {name: library_version(name) for name in names}


def file_lock(path: Path):
    """A cross-process lock beside an artifact, ``<path>.lock`` (works on a shared folder too)."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` only if the block succeeds.

    An existing ``target`` is replaced. Leftover temporary folders from killed runs are
    named ``<target>.tmp-*`` and are never read; :func:`sweep_partials` removes them.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a file so readers see either the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def sweep_partials(folder: Path, min_age_s: float = 600.0) -> int:
    """Remove half-written artifacts that killed runs left below ``folder``.

    The folder may be shared by workers that are writing right now: a partial folder goes
    only if its artifact's lock (``<target>.lock``) is free, a partial file only once it is
    older than ``min_age_s`` (file writes take milliseconds).
    """
    from filelock import FileLock, Timeout

    removed = 0
    if not folder.is_dir():
        return 0
    now = time.time()
    for path in list(folder.rglob(f"*{_TMP_MARK}*")):
        if not path.exists():  # inside a partial folder removed a moment ago
            continue
        if path.is_dir():
            target = str(path).rsplit(_TMP_MARK, 1)[0]
            try:
                with FileLock(target + ".lock", timeout=0):
                    shutil.rmtree(path, ignore_errors=True)
            except Timeout:
                continue  # a live worker is building it
        else:
            try:
                if now - path.stat().st_mtime < min_age_s:
                    continue
                path.unlink()
            except OSError:
                continue
        removed += 1
    return removed


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes: what it holds, wherever it lies and whenever it was written.

    Hashing a model's weights takes seconds per GB, so the digest is kept in the user cache,
    keyed on the file's resolved path and reused while its size, mtime and inode are unchanged
    (a copied or touched file is hashed again, once).
    """
    path = path.resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    record = cache_root() / "digests" / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(record.read_text())
        if known.get("path") == str(path) and known.get("stamp") == stamp:
            return known["sha256"]
    except (OSError, ValueError):
        pass  # not hashed yet, or a record half-written by an older release: hash it
    with path.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        atomic_write_text(record, json.dumps({"path": str(path), "stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # a read-only cache costs the next run the hashing again, nothing else
    return digest


def folder_size(path: Path) -> int:
    """Bytes of all files below ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
