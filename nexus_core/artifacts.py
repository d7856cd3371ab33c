"""Artifacts: versioned directories, atomic writes, and ``manifest.json`` written last.

An artifact is a directory ``data/processed/<area>/<name>_v<N>/`` holding its files and a
``manifest.json``. The manifest is written last and atomically, so a directory without one is
not an artifact (an interrupted run) and is ignored by every reader.
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

from nexus_core.settings import data_root

MANIFEST = "manifest.json"
# a staging dir's name says which process builds it, so a later run can sweep it once that process is gone
_STAGING = re.compile(r"\.staging-(?P<host>.+)-(?P<pid>\d+)-[^-]*$")
_VERSION_DIR = re.compile(r"^(?P<name>.+)_v(?P<version>\d+)$")


class ArtifactRef(BaseModel):
    """A pointer to a finished artifact: what steps pass each other instead of objects."""

    uri: str = Field(description="Directory (local path or fsspec URI) holding the artifact")
    kind: str = Field(description="dataset, model, report, ...")
    name: str = Field(description="Artifact name, e.g. teacher_inputs")
    version: int = Field(description="Version number N of <name>_v<N>")
    digest: str = Field(description="sha256 over the artifact's files (manifest excluded)")
    rows: int | None = Field(default=None, description="Row count for tables")
    bytes: int | None = Field(default=None, description="Total size of the artifact's files")

    @property
    def path(self) -> Path:
        """Local path of the artifact directory."""
        return Path(self.uri)

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


def data_root_id(root: Path | None = None) -> str:
    """A random id written once into the data root (``.nexus-root-id``).

    Task cache keys include it: delete the data root but keep Prefect's result store, and cached
    steps run again instead of returning refs to directories that are gone.
    """
    root = root or data_root()
    marker = root / ".nexus-root-id"
    if not marker.is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.{os.getpid()}.tmp")
        tmp.write_text(os.urandom(16).hex())
        try:
            os.link(tmp, marker)  # create-if-absent in one step: concurrent first runs agree on one id
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return marker.read_text().strip()


def area_dir(area: str, root: Path | None = None) -> Path:
    """``data/processed/<area>``."""
    return (root or data_root()) / "processed" / area


def list_versions(area: str, name: str, root: Path | None = None) -> list[int]:
    """Finished versions (those with a manifest) of ``<area>/<name>``, ascending."""
    base = area_dir(area, root)
    if not base.is_dir():
        return []
    found = []
    for child in base.iterdir():
        m = _VERSION_DIR.match(child.name)
        if m and m.group("name") == name and (child / MANIFEST).is_file():
            found.append(int(m.group("version")))
    return sorted(found)


def version_dir(area: str, name: str, version: int, root: Path | None = None) -> Path:
    """``data/processed/<area>/<name>_v<version>``."""
    return area_dir(area, root) / f"{name}_v{version}"


def read_manifest(uri: str | Path) -> Manifest:
    """Load ``manifest.json`` of an artifact directory."""
    from nexus_core.errors import InputError

    path = Path(uri) / MANIFEST
    if not path.is_file():
        raise InputError(f"{uri}: not an artifact (no {MANIFEST}; an interrupted run?)")
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise InputError(f"{path}: unreadable manifest: {exc}") from exc


def iter_manifests(root: Path | None = None) -> Iterator[Manifest]:
    """Every finished artifact under ``data/processed``."""
    base = (root or data_root()) / "processed"
    if not base.is_dir():
        return
    for path in sorted(base.glob(f"*/*/{MANIFEST}")):
        try:
            yield Manifest.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError:
            continue


def publish(
    staging: Path, area: str, name: str, make_manifest: Callable[[int, Path], Manifest],
    root: Path | None = None,
) -> Manifest:
    """Turn a finished staging directory into the next version ``<name>_v<N>``.

    Every file is flushed to disk first (a power cut after the rename must not leave a manifest over
    empty files); then, under a lock on the area: pick N, write ``manifest.json`` into the staging
    directory (last, and atomically), rename the directory into place and flush the area directory,
    so readers see all of it or none of it. Earlier versions are never touched.
    """
    base = area_dir(area, root)
    base.mkdir(parents=True, exist_ok=True)
    fsync_tree(staging)
    with open(base / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = max(_all_version_numbers(base, name), default=0) + 1
        target = base / f"{name}_v{version}"
        manifest = make_manifest(version, target)
        atomic_write_text(staging / MANIFEST, manifest.model_dump_json(indent=2, by_alias=True))
        os.rename(staging, target)
        fsync_dir(base)
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


def staging_dir(area: str, name: str, root: Path | None = None) -> Path:
    """A fresh empty directory beside the versions, to build an artifact in before publishing. Its
    name records the owner (host and pid), so a later run can sweep it if that process was killed."""
    base = area_dir(area, root)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.staging-{socket.gethostname()}-{os.getpid()}-", dir=base))


def process_alive(pid: int) -> bool:
    """Whether a process with this pid runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_staging(root: Path | None = None) -> list[Path]:
    """Delete staging directories whose owner process on this host is gone (a killed run), and
    owner-less ones older than a day. Returns what was removed."""
    base = (root or data_root()) / "processed"
    if not base.is_dir():
        return []
    host, removed = socket.gethostname(), []
    for path in base.glob("*/.*.staging-*"):
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
