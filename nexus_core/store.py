"""The store: where artifacts live. A local directory or any fsspec URI (``s3://``, ``gs://``, ``file://``).

``NEXUS_DATA`` names it (default ``./data``). Artifacts sit at ``processed/<area>/<name>_v<N>/`` inside
the store, and every manifest, catalog row and Prefect result names them by that **store-relative**
URI, so a store can move (copy it, point ``NEXUS_DATA`` at the copy) and a second machine that uses the
same store sees the same artifacts under the same names.

- Steps always read and write local files. A step writes its output into a local staging directory;
  publishing moves it into the store (a rename on a local store, an upload with ``manifest.json`` last
  on a remote one). An input in a remote store is downloaded once into ``NEXUS_HOME/store-cache``
  (checked against its digest) when a step asks for ``ref.path``.
- URIs: ``processed/...`` or ``raw/...`` is store-relative; an absolute path is a local file outside the
  store (a raw corpus, a model in the HF cache); ``scheme://...`` is a remote file (downloaded on use).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from nexus_core.settings import nexus_home

MANIFEST = "manifest.json"
STORE_PREFIXES = ("processed/", "raw/")


def store_url() -> str:
    """The store as configured: ``NEXUS_DATA``, default ``data`` (relative to the working directory)."""
    return os.environ.get("NEXUS_DATA") or "data"


def is_remote_url(url: str) -> bool:
    """Whether ``url`` names a non-local filesystem (``s3://``, ``gs://``, ``memory://``...)."""
    return "://" in url and not url.startswith("file://")


def is_store_relative(uri: str) -> bool:
    """Whether ``uri`` is relative to the store (how manifests name artifacts)."""
    return uri.startswith(STORE_PREFIXES)


class Store:
    """One store root: local (``root`` is a Path) or remote (``fs`` and ``base``)."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") or url
        self.remote = is_remote_url(url)
        self.root: Path | None = None
        self.fs: Any = None
        self.base = ""
        if self.remote:
            import fsspec

            self.fs, path = fsspec.core.url_to_fs(self.url)
            self.base = path.rstrip("/")
        else:
            self.root = Path(url.removeprefix("file://")).expanduser().resolve()

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    # ---------------------------------------------------------------- paths

    def full(self, rel: str) -> str:
        """The absolute location of ``rel``: a local path, or ``scheme://bucket/...``."""
        if self.root is not None:
            return str(self.root / rel)
        return f"{self.url}/{rel}"

    def _path(self, rel: str) -> str:
        """``rel`` as the filesystem's own path (no scheme), for fsspec calls."""
        return f"{self.base}/{rel}" if rel else self.base

    # ---------------------------------------------------------------- reads
    # Remote reads drop fsspec's listing cache first: other processes and machines write to the store.

    def exists(self, rel: str) -> bool:
        if self.root is not None:
            return (self.root / rel).exists()
        self.fs.invalidate_cache()
        return bool(self.fs.exists(self._path(rel)))

    def read_text(self, rel: str) -> str | None:
        """Text of a file in the store, None if absent."""
        if self.root is not None:
            p = self.root / rel
            return p.read_text(encoding="utf-8") if p.is_file() else None
        try:
            return self.fs.cat_file(self._path(rel)).decode("utf-8")
        except FileNotFoundError:
            return None

    def glob(self, pattern: str) -> list[str]:
        """Store-relative paths matching ``pattern`` (fsspec glob rules), sorted."""
        if self.root is not None:
            return sorted(p.relative_to(self.root).as_posix() for p in self.root.glob(pattern))
        prefix = f"{self.base}/"
        self.fs.invalidate_cache()
        return sorted(p[len(prefix):] for p in self.fs.glob(self._path(pattern)) if p.startswith(prefix))

    def listdir(self, rel: str) -> list[str]:
        """Names directly under ``rel`` (empty if absent)."""
        if self.root is not None:
            p = self.root / rel
            return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
        self.fs.invalidate_cache()
        try:
            return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in self.fs.ls(self._path(rel), detail=False))
        except FileNotFoundError:
            return []

    # ---------------------------------------------------------------- writes (remote stores)

    def write_text(self, rel: str, text: str) -> None:
        """Write one small file (remote: one PUT, which S3 makes visible whole or not at all)."""
        if self.root is not None:
            from nexus_core.artifacts import atomic_write_text

            atomic_write_text(self.root / rel, text)
        else:
            self.fs.pipe_file(self._path(rel), text.encode("utf-8"))

    def put_tree(self, local: Path, rel: str, last: str = MANIFEST) -> None:
        """Upload every file under ``local`` to ``rel``, the file named ``last`` after all others."""
        files = sorted(p for p in local.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(local).as_posix() == last)
        for file in files:
            self.fs.put_file(str(file), self._path(f"{rel}/{file.relative_to(local).as_posix()}"))

    def get_tree(self, rel: str, local: Path) -> None:
        """Download every file under ``rel`` into ``local``."""
        src = self._path(rel)
        for remote in self.fs.find(src):
            dest = local / remote[len(src) + 1:]
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(dest))

    def delete(self, rel: str) -> None:
        """Remove ``rel`` and everything under it (a claim that lost a race)."""
        if self.root is not None:
            shutil.rmtree(self.root / rel, ignore_errors=True)
        else:
            try:
                self.fs.rm(self._path(rel), recursive=True)
            except FileNotFoundError:
                pass


@cache
def _store(url: str) -> Store:
    return Store(url)


def store_for(root: str | Path | None = None) -> Store:
    """The store at ``root`` (a path or URI), default the configured one (``NEXUS_DATA``)."""
    if root is None:
        url = store_url()
        return _store(url if is_remote_url(url) else str(Path(url.removeprefix("file://")).expanduser().resolve()))
    return _store(str(root) if is_remote_url(str(root)) else str(Path(root).expanduser().resolve()))


def scratch_dir(kind: str) -> Path:
    """A local directory under ``NEXUS_HOME`` for files on their way to or from a remote store."""
    path = nexus_home() / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def locate(uri: str, root: str | Path | None = None) -> tuple[Store | None, str]:
    """Which store holds ``uri``, and its path inside: the configured store (or ``root``) for a
    store-relative URI, the parent location for a ``scheme://`` URI, None for a plain local path."""
    if is_store_relative(uri):
        return store_for(root), uri
    if is_remote_url(uri):
        parent, _, name = uri.rstrip("/").rpartition("/")
        return store_for(parent), name
    return None, uri.removeprefix("file://")


def local_path(uri: str, digest: str | None = None) -> Path:
    """A local directory or file holding ``uri``'s content (see the module docstring for URI forms).

    Store-relative URIs on a local store resolve in place; on a remote store (and for ``scheme://``
    URIs) the content is downloaded once into ``NEXUS_HOME/store-cache`` and, when ``digest`` is given,
    checked against it before use.
    """
    store, rel = locate(uri)
    if store is None:
        return Path(rel)
    if store.root is not None:
        return store.root / rel
    return _cached(store, rel, digest)


def cache_path(rel: str, digest: str | None = None) -> Path:
    """Where the local copy of a remote store's ``rel`` lives (``NEXUS_HOME/store-cache``)."""
    return scratch_dir("store-cache") / (rel.replace("/", "__") + (f"-{digest[:12]}" if digest else ""))


def fill_once(target: Path, fill: Callable[[Path], None]) -> Path:
    """``target``, made by ``fill(tmp)`` into a fresh directory beside it and renamed into place, so a
    reader never sees half a download. When another process finished first, its copy is kept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fill(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished the same download first
            pass
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cached(store: Store, rel: str, digest: str | None) -> Path:
    """Download ``rel`` (a directory or one file) from a remote ``store`` into the local cache once;
    verify an artifact's ``digest`` if given."""
    from nexus_core.artifacts import dir_digest
    from nexus_core.errors import InputError

    target = cache_path(rel, digest)
    if target.exists():
        return target
    src = store._path(rel)
    if not store.fs.exists(src):
        raise InputError(f"{store.full(rel)}: not found in the store")
    if not store.fs.isdir(src):
        tmp_file = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        store.fs.get_file(src, str(tmp_file))
        os.replace(tmp_file, target)
        return target

    def download(tmp: Path) -> None:
        store.get_tree(rel, tmp)
        if digest and (tmp / MANIFEST).is_file():
            got, _ = dir_digest(tmp)
            if got != digest:
                raise InputError(f"{store.full(rel)}: digest mismatch after download ({got[:12]} != {digest[:12]})")

    return fill_once(target, download)


def owner_tag() -> str:
    """``host-pid``: who holds a staging directory or a version claim."""
    return f"{socket.gethostname()}-{os.getpid()}"


def as_local(path: str | Path) -> Path:
    """A path argument as a local path: store-relative and ``scheme://`` strings resolve through
    :func:`local_path` (so an artifact's URI works wherever a model directory is expected)."""
    if isinstance(path, str) and (is_store_relative(path) or is_remote_url(path)):
        return local_path(path)
    return Path(path)
