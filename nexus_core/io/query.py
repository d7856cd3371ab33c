"""DataQuery: list datasets and their versions, and load one by name and version."""

from __future__ import annotations

from pathlib import Path

import polars as pl
from pydantic import BaseModel

from nexus_core.artifacts import ArtifactRef, Manifest, iter_manifests, read_manifest, version_uri
from nexus_core.errors import InputError
from nexus_core.io.tables import JSONL_SUFFIXES, read_table
from nexus_core.store import store_for


class DatasetInfo(BaseModel):
    """One artifact name with the versions that exist."""

    area: str
    name: str
    kind: str
    versions: list[int]
    latest_uri: str
    rows: int | None


def parse_spec(spec: str) -> tuple[str, int | None]:
    """``"name@v3"`` → ``("name", 3)``; ``"name"`` and ``"name@latest"`` → ``("name", None)`` (latest)."""
    if "@" not in spec:
        return spec, None
    name, version = spec.rsplit("@", 1)
    if version == "latest":
        return name, None
    try:
        return name, int(version.lstrip("v"))
    except ValueError:
        raise InputError(f"{spec!r}: version must look like @v3 or @latest") from None


class DataQuery:
    """Read-only view of the artifacts in a store (default ``NEXUS_DATA`` or ``./data``)."""

    def __init__(self, root: str | Path | None = None):
        self.store = store_for(root)
        self.root = self.store.root or self.store.url

    def manifests(self) -> list[Manifest]:
        """Every finished artifact's manifest."""
        return list(iter_manifests(self.root))

    def list(self, area: str | None = None) -> list[DatasetInfo]:
        """Artifacts grouped by (area, name), with their versions ascending."""
        groups: dict[tuple[str, str], list[Manifest]] = {}
        for m in self.manifests():
            a = Path(m.uri).parent.name
            if area is None or a == area:
                groups.setdefault((a, m.name), []).append(m)
        out = []
        for (a, name), ms in sorted(groups.items()):
            ms.sort(key=lambda m: m.version)
            out.append(DatasetInfo(area=a, name=name, kind=ms[-1].kind, versions=[m.version for m in ms],
                                   latest_uri=ms[-1].uri, rows=ms[-1].rows))
        return out

    def manifest(self, spec: str) -> Manifest:
        """Manifest of ``name``, ``name@vN`` or ``area/name@vN`` (latest version if none given)."""
        name, version = parse_spec(spec)
        area = None
        if "/" in name:
            area, name = name.split("/", 1)
        matches = [i for i in self.list(area) if i.name == name]
        if not matches:
            known = ", ".join(sorted({i.name for i in self.list()})) or "none yet"
            raise InputError(f"no dataset named {name!r} under {self.root} (known: {known})")
        if len(matches) > 1:
            raise InputError(f"{name!r} exists in several areas ({', '.join(i.area for i in matches)}): "
                             f"use area/name")
        info = matches[0]
        version = version or info.versions[-1]
        if version not in info.versions:
            raise InputError(f"{name}: no version v{version} (have {', '.join(f'v{v}' for v in info.versions)})")
        return read_manifest(version_uri(info.area, name, version), self.store.url)

    def ref(self, spec: str) -> ArtifactRef:
        """ArtifactRef of ``name[@vN]``."""
        return self.manifest(spec).ref()

    def load(self, spec: str, table: str | None = None) -> pl.DataFrame:
        """Load the main table of ``name[@vN]`` (or the file named ``table`` inside it)."""
        m = self.manifest(spec)
        return load_table(m.ref(), table)


def table_files(ref: ArtifactRef) -> list[Path]:
    """The table files (Parquet/JSONL) inside an artifact directory, sorted."""
    root = ref.path
    return sorted(p for p in root.rglob("*") if p.is_file() and (p.name.endswith(".parquet")
                                                               or p.name.endswith(JSONL_SUFFIXES)))


def load_table(ref: ArtifactRef, table: str | None = None) -> pl.DataFrame:
    """Load one table of an artifact: the file named ``table``, else ``data.parquet``, else the only one."""
    if table:
        return read_table(ref.path / table)
    if (ref.path / "data.parquet").is_file():
        return read_table(ref.path / "data.parquet")
    files = table_files(ref)
    if len(files) != 1:
        raise InputError(f"{ref.uri}: {len(files)} table files; name one ({', '.join(p.name for p in files)})")
    return read_table(files[0])


TABLE_SUFFIXES = {".jsonl", ".parquet", ".gz", ".zst", ".json", ".ndjson", ".csv"}


def resolve_ref(spec: str, role: str = "input") -> ArtifactRef:
    """The one artifact resolver every flow uses: ``spec`` is an artifact directory, any local file or
    directory (a raw input, digest-keyed), a store-relative URI (``processed/<area>/<name>_v<N>``), an
    fsspec URI of an artifact (``s3://...``), or ``[area/]name[@vN]`` of an artifact in the store.

    ``role`` names the input in errors ("dataset sft", "model"). Models may also be hub ids: resolve
    them with :func:`nexus_core.models.io.resolve_model`.
    """
    from nexus_core.artifacts import MANIFEST, raw_ref
    from nexus_core.store import is_remote_url

    if spec.startswith("processed/") or is_remote_url(spec):
        return read_manifest(spec).ref()  # its error names the URI
    path = Path(spec).expanduser()
    if path.is_dir() and (path / MANIFEST).is_file():
        return read_manifest(path).ref()
    if path.exists():
        return raw_ref(path)
    if spec.startswith(("/", ".", "~")) or Path(spec.split("@")[0]).suffix in TABLE_SUFFIXES:
        raise InputError(f"{role} {spec}: no such file or directory")
    try:
        return DataQuery().ref(spec)
    except InputError as exc:
        raise InputError(f"{role} {spec!r}: not a path and not a known artifact ({exc})") from None
