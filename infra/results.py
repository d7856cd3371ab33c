"""Remote results: Prefect result storage and Nexus artifacts on any fsspec URI.

A remote machine's local disk dies with it, so on GPU pools:

- **Prefect results** (task/flow return values, hence the cache) go to a ``RemoteFileSystem``
  block on an fsspec URI (``s3://bucket/prefect-results`` by default for remote pools; any
  S3-compatible store through ``AWS_ENDPOINT_URL``). :func:`register_result_storage` saves the
  block; deployments then set ``PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK=remote-file-system/<name>``.
- **Artifacts** are published by every step straight into the store, ``NEXUS_DATA`` (any fsspec URI:
  :mod:`nexus_core.store`). :func:`mirror_artifacts` copies an existing local store into a remote one
  (to move to a remote store) — files first, ``manifest.json`` last, so a half-copied version is never
  taken for a finished one. :func:`fetch_artifact` brings one back and checks its digest.

    python -m infra.results register s3://my-bucket/prefect-results
    python -m infra.results mirror  s3://my-bucket/nexus-data
"""

from __future__ import annotations

import sys
from pathlib import Path

from nexus_core.artifacts import MANIFEST, dir_digest, read_manifest
from nexus_core.errors import InputError
from nexus_core.settings import data_root


def _fs(uri: str):  # noqa: ANN202 - (fsspec filesystem, path inside it)
    import fsspec

    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path.rstrip("/")


def register_result_storage(uri: str, name: str = "nexus-results", overwrite: bool = True) -> str:
    """Save a RemoteFileSystem block at ``uri``; return the value for PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK."""
    from prefect.filesystems import RemoteFileSystem

    RemoteFileSystem(basepath=uri).save(name, overwrite=overwrite)
    return f"remote-file-system/{name}"


def mirror_artifacts(remote_root: str, local_root: Path | None = None) -> list[str]:
    """Copy every finished artifact version not yet mirrored to ``remote_root``; return their remote URIs.

    Versions are immutable, so one already present remotely (manifest there) is skipped.
    """
    fs, base = _fs(remote_root)
    local_root = local_root or data_root()
    done = []
    for manifest in sorted((local_root / "processed").glob(f"*/*/{MANIFEST}")):
        version = manifest.parent
        rel = version.relative_to(local_root).as_posix()
        target = f"{base}/{rel}"
        if fs.exists(f"{target}/{MANIFEST}"):
            continue
        for file in sorted(p for p in version.rglob("*") if p.is_file() and p.name != MANIFEST):
            dest = f"{target}/{file.relative_to(version).as_posix()}"
            fs.makedirs(dest.rsplit("/", 1)[0], exist_ok=True)
            fs.put_file(str(file), dest)
        fs.put_file(str(manifest), f"{target}/{MANIFEST}")     # last: marks the copy complete
        done.append(f"{remote_root.rstrip('/')}/{rel}")
    return done


def fetch_artifact(remote_uri: str, local_dir: Path) -> Path:
    """Download one mirrored artifact version to ``local_dir`` and verify its digest."""
    fs, path = _fs(remote_uri)
    if not fs.exists(f"{path}/{MANIFEST}"):
        raise InputError(f"{remote_uri}: not a finished artifact (no {MANIFEST})")
    local_dir.mkdir(parents=True, exist_ok=True)
    for remote in fs.find(path):
        dest = local_dir / remote[len(path) + 1:]
        dest.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(remote, str(dest))
    digest, _ = dir_digest(local_dir)
    expected = read_manifest(local_dir).digest
    if digest != expected:
        raise InputError(f"{remote_uri}: digest mismatch after download ({digest[:12]} != {expected[:12]})")
    return local_dir


def main(argv: list[str] | None = None) -> int:
    """``register URI [NAME]`` or ``mirror URI``."""
    from nexus_core.settings import configure_environment

    configure_environment()
    args = sys.argv[1:] if argv is None else argv
    if len(args) >= 2 and args[0] == "register":
        print(register_result_storage(args[1], *(args[2:3] or [])))
    elif len(args) == 2 and args[0] == "mirror":
        print("\n".join(mirror_artifacts(args[1])) or "nothing new to mirror")
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
