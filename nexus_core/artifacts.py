"""Artifacts: versioned directories, atomic writes, and ``manifest.json`` written last.

An artifact is a directory ``processed/<area>/<name>_v<N>/`` in the store (:mod:`nexus_core.store`:
``NEXUS_DATA``, a local directory or any fsspec URI) holding its files and a ``manifest.json``. The
manifest is written last and atomically, so a directory without one is not an artifact (an interrupted
run) and is ignored by every reader. Manifests and refs name artifacts by their store-relative URI
(``processed/<area>/<name>_v<N>``); ``ArtifactRef.path`` is where a step reads one locally.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from nexus_core.store import (
    MANIFEST,
    Store,
    cache_path,
    local_path,
    locate,
    owner_tag,
    scratch_dir,
    store_for,
)

# a staging dir's name says which process builds it, so a later run can sweep it once that process is gone
_STAGING = re.compile(r"\.staging-(?P<host>.+)-(?P<pid>\d+)-[^-]*$")
_VERSION_DIR = re.compile(r"^(?P<name>.+)_v(?P<version>\d+)$")


class ArtifactRef(BaseModel):
    """A pointer to a finished artifact: what steps pass each other instead of objects."""

    uri: str = Field(description="Store-relative (processed/<area>/<name>_v<N>), a local path, or an fsspec URI")
    kind: str = Field(description="dataset, model, report, ...")
    name: str = Field(description="Artifact name, e.g. teacher_inputs")
    version: int = Field(description="Version number N of <name>_v<N>")
    digest: str = Field(description="sha256 over the artifact's files (manifest excluded)")
    rows: int | None = Field(default=None, description="Row count for tables")
    bytes: int | None = Field(default=None, description="Total size of the artifact's files")

    @property
    def path(self) -> Path:
        """A local directory (or file) with the artifact's content: in place on a local store, else
        downloaded once into ``NEXUS_HOME/store-cache`` and checked against the digest."""
        return local_path(self.uri, self.digest if self.version else None)

    def __str__(self) -> str:
        return f"{self.name}@v{self.version} ({self.uri})"


class Manifest(BaseModel):
    """Everything needed to trace an artifact back to the config, inputs and code that made it."""

    kind: str
    name: str
    version: int
    uri: str
    digest: str
    step: str
    rows: int | None = None
    bytes: int = 0
    schema_: dict[str, str] | None = Field(default=None, alias="schema")
    config: dict[str, Any] = Field(default_factory=dict, description="Resolved config, secrets redacted")
    config_hash: str
    code_hash: str = Field(description="sha256 of the step module's source and every in-repo module it imports")
    cache_key: str = Field(default="", description="The step's cache key (config, inputs, code, files read)")
    files: dict[str, str] = Field(default_factory=dict,
                                  description="Files the step read (prompt templates, rules, rubrics): path -> sha256")
    inputs: dict[str, ArtifactRef] = Field(default_factory=dict)
    code_version: dict[str, Any] = Field(default_factory=dict, description="git sha and dirty flag")
    metrics: dict[str, float] = Field(default_factory=dict)
    cost: dict[str, float] = Field(default_factory=dict)
    result: dict[str, Any] = Field(default_factory=dict, description="The step's result, for idempotent re-runs")
    prefect: dict[str, str | None] = Field(default_factory=dict)
    mlflow_run_id: str | None = None
    started_at: str
    finished_at: str

    model_config = {"populate_by_name": True}

    def ref(self) -> ArtifactRef:
        """The ArtifactRef pointing at this manifest's artifact."""
        return ArtifactRef(
            uri=self.uri, kind=self.kind, name=self.name, version=self.version,
            digest=self.digest, rows=self.rows, bytes=self.bytes,
        )


def now_iso() -> str:
    """UTC timestamp in ISO 8601."""
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------- atomic writes


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename it over ``target`` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> Path:
    """Write bytes to ``target`` atomically (temp file, fsync, rename)."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(target)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write UTF-8 text to ``target`` atomically."""
    return atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: str | Path, data: Any) -> Path:
    """Write JSON (indented, sorted keys) to ``target`` atomically."""
    return atomic_write_text(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# ---------------------------------------------------------------- digests


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of one file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def dir_digest(path: str | Path, exclude: tuple[str, ...] = (MANIFEST,)) -> tuple[str, int]:
    """(sha256 over relative names and contents of every file under ``path``, total bytes)."""
    root = Path(path)
    h = hashlib.sha256()
    total = 0
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode() + b"\0" + file_sha256(file).encode() + b"\n")
        total += file.stat().st_size
    return h.hexdigest(), total


def source_hash(*texts: str) -> str:
    """sha256 of source texts (step module code, prompt templates), 16 hex chars."""
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8") + b"\0")
    return h.hexdigest()[:16]


def code_version() -> dict[str, Any]:
    """Git sha of the working tree and whether it has uncommitted changes (None outside git)."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip()
        )
        return {"git_sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "dirty": None}


# ---------------------------------------------------------------- versions


def data_root_id(root: Path | str | None = None) -> str:
    """A random id written once into the store (``.nexus-root-id``).

    Task cache keys include it: delete the store but keep Prefect's result store, and cached steps run
    again instead of returning refs to artifacts that are gone. It lives in the store, so every machine
    using the same store agrees on it (and reuses each other's cached steps).
    """
    store = store_for(root)
    if store.root is None:
        if (found := store.read_text(".nexus-root-id")) is None:
            store.write_text(".nexus-root-id", os.urandom(16).hex())  # two first runs at once: last wins
            found = store.read_text(".nexus-root-id") or ""
        return found.strip()
    marker = store.root / ".nexus-root-id"
    if not marker.is_file():
        store.root.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(os.urandom(16).hex())
        try:
            os.link(tmp, marker)  # create-if-absent in one step: concurrent first runs agree on one id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return marker.read_text().strip()


def version_uri(area: str, name: str, version: int) -> str:
    """The store-relative URI of ``<area>/<name>`` version ``version``."""
    return f"processed/{area}/{name}_v{version}"


def _local_root(root: Path | str | None) -> Path:
    store = store_for(root)
    if store.root is None:
        raise ValueError(f"{store.url} is a remote store: it has no local directory")
    return store.root


def area_dir(area: str, root: Path | str | None = None) -> Path:
    """``<local store>/processed/<area>``."""
    return _local_root(root) / "processed" / area


def list_versions(area: str, name: str, root: Path | str | None = None) -> list[int]:
    """Finished versions (those with a manifest) of ``<area>/<name>``, ascending."""
    found = []
    for rel in store_for(root).glob(f"processed/{area}/{name}_v*/{MANIFEST}"):
        m = _VERSION_DIR.match(rel.split("/")[-2])
        if m and m.group("name") == name:
            found.append(int(m.group("version")))
    return sorted(found)


def version_dir(area: str, name: str, version: int, root: Path | str | None = None) -> Path:
    """The local directory of a version on a local store."""
    return _local_root(root) / version_uri(area, name, version)


def read_manifest(uri: str | Path, root: Path | str | None = None) -> Manifest:
    """Load ``manifest.json`` of an artifact (store-relative URI, local directory or fsspec URI)."""
    from nexus_core.errors import InputError

    store, rel = locate(str(uri), root)
    if store is not None:
        where, text = store.full(f"{rel}/{MANIFEST}"), store.read_text(f"{rel}/{MANIFEST}")
    else:
        path = Path(rel) / MANIFEST
        where, text = str(path), path.read_text(encoding="utf-8") if path.is_file() else None
    if text is None:
        raise InputError(f"{uri}: not an artifact (no {MANIFEST}; an interrupted run?)")
    try:
        return Manifest.model_validate_json(text)
    except ValueError as exc:
        raise InputError(f"{where}: unreadable manifest: {exc}") from exc


def manifest_uris(root: Path | str | None = None) -> list[str]:
    """Store-relative URIs of every finished artifact (a listing; no manifest is read)."""
    return [rel.rsplit("/", 1)[0] for rel in store_for(root).glob(f"processed/*/*/{MANIFEST}")]


def iter_manifests(root: Path | str | None = None, skip: set[str] | frozenset[str] = frozenset()) -> Iterator[Manifest]:
    """Every finished artifact in the store (those whose URI is in ``skip`` are not read)."""
    store = store_for(root)
    for uri in manifest_uris(root):
        if uri in skip:
            continue
        try:
            yield Manifest.model_validate_json(store.read_text(f"{uri}/{MANIFEST}") or "")
        except ValueError:
            continue


def publish(
    staging: Path, area: str, name: str, make_manifest: Callable[[int, str], Manifest],
    root: Path | str | None = None,
) -> Manifest:
    """Turn a finished staging directory into the next version ``<name>_v<N>`` of the store.

    ``make_manifest(version, uri)`` builds the manifest once the version is known. On a local store
    every file is flushed to disk first (a power cut after the rename must not leave a manifest over
    empty files); then, under a lock on the area: pick N, write ``manifest.json`` into the staging
    directory (last, and atomically), rename the directory into place and flush the area directory,
    so readers see all of it or none of it. A remote store: see :func:`_publish_remote`. Earlier
    versions are never touched.
    """
    store = store_for(root)
    if store.root is None:
        return _publish_remote(store, staging, area, name, make_manifest)
    base = area_dir(area, root)
    base.mkdir(parents=True, exist_ok=True)
    fsync_tree(staging)
    with open(base / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = max(_all_version_numbers(base, name), default=0) + 1
        manifest = make_manifest(version, version_uri(area, name, version))
        atomic_write_text(staging / MANIFEST, manifest.model_dump_json(indent=2, by_alias=True))
        os.rename(staging, base / f"{name}_v{version}")
        fsync_dir(base)
    return manifest


def _publish_remote(store: Store, staging: Path, area: str, name: str,
                    make_manifest: Callable[[int, str], Manifest]) -> Manifest:
    """Upload a staging directory as the next version: claim N, upload the files, ``manifest.json`` last.

    A claim is a small object ``processed/<area>/.claims/<name>_v<N>`` holding this process's token,
    written only if no version or claim N exists and read back (S3 reads after writes are consistent);
    a process that reads back another token moves to N+1. Readers see a version once its manifest is
    there. A publisher killed midway leaves files without a manifest and its claim: that N is skipped.
    """
    token = f"{owner_tag()}-{os.urandom(4).hex()}"
    claims = f"processed/{area}/.claims"
    taken = [int(m.group("version")) for n in store.listdir(f"processed/{area}") + store.listdir(claims)
             if (m := _VERSION_DIR.match(n)) and m.group("name") == name]
    version = max(taken, default=0) + 1
    while True:
        claim = f"{claims}/{name}_v{version}"
        if not store.exists(claim) and not store.exists(version_uri(area, name, version)):
            store.write_text(claim, token)
            if store.read_text(claim) == token:
                break
        version += 1
    uri = version_uri(area, name, version)
    manifest = make_manifest(version, uri)
    atomic_write_text(staging / MANIFEST, manifest.model_dump_json(indent=2, by_alias=True))
    store.put_tree(staging, uri, last=MANIFEST)
    store.delete(claim)
    try:  # the next step reads it from here instead of downloading it again
        os.rename(staging, cache_path(uri, manifest.digest))
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk."""
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _all_version_numbers(base: Path, name: str) -> list[int]:
    out = []
    for child in base.iterdir():
        m = _VERSION_DIR.match(child.name)
        if m and m.group("name") == name:
            out.append(int(m.group("version")))
    return out


def staging_dir(area: str, name: str, root: Path | str | None = None) -> Path:
    """A fresh empty local directory to build an artifact in before publishing: beside the versions on
    a local store (publishing is a rename), under ``NEXUS_HOME/staging`` for a remote one. Its name
    records the owner (host and pid), so a later run can sweep it if that process was killed."""
    store = store_for(root)
    base = area_dir(area, root) if store.root is not None else scratch_dir("staging") / area
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.staging-{owner_tag()}-", dir=base))


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(root: Path | str | None = None) -> list[Path]:
    """Delete staging directories whose owner process on this host is gone (a killed run), and
    owner-less ones older than a day. Returns what was removed."""
    store = store_for(root)
    bases = [scratch_dir("staging")] + ([store.root / "processed"] if store.root is not None else [])
    host, removed = socket.gethostname(), []
    for path in (p for base in bases if base.is_dir() for p in base.glob("*/.*.staging-*")):
        m = _STAGING.search(path.name)
        if m:
            stale = m.group("host") == host and not process_alive(int(m.group("pid")))
        else:  # from an older version of Nexus: no owner in the name
            stale = time.time() - path.stat().st_mtime > 86400
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def remove_tree(path: Path) -> None:
    """Delete a directory tree if present (staging leftovers)."""
    shutil.rmtree(path, ignore_errors=True)


def raw_ref(path: str | Path) -> ArtifactRef:
    """An ArtifactRef for a raw input file or directory (version 0), so its digest joins cache keys."""
    from nexus_core.errors import InputError

    p = Path(path).resolve()
    if p.is_file():
        digest, size = file_sha256(p), p.stat().st_size
    elif p.is_dir():
        digest, size = dir_digest(p, exclude=())
    else:
        raise InputError(f"{path}: file not found")
    return ArtifactRef(uri=str(p), kind="raw", name=p.name, version=0, digest=digest, bytes=size)
