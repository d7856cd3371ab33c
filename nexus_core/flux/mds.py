"""MDS shard I/O on top of mosaicml-streaming: write, record and verify sha256, merge groups, read.

mosaicml-streaming never re-checks a shard already on local disk, so every writer here
records the sha256 of each shard in ``shard_hashes.json`` at write time and :func:`verify_shards`
checks them before anything reads the data.

Layouts: a precompute writes one MDS directory per *shard group* (``groups/<k>/``), so an interrupted
run resumes group by group. ``nested`` keeps the group directories and writes a root ``index.json``
pointing into them; ``flat`` moves every shard into the root (``g<k>.shard.<n>.mds``).

Image columns (``png``/``jpeg``) also take :class:`Encoded` bytes, already in the column's format: a
writer thread pool can then encode images in parallel (and at its own JPEG quality) instead of the
writer re-encoding every image on one thread.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from nexus_core.artifacts import atomic_write_json, file_sha256
from nexus_core.errors import InputError

HASHES = "shard_hashes.json"
INDEX = "index.json"
IMAGE_ENCODINGS = ("png", "jpeg")


class Encoded(bytes):
    """Image bytes already encoded as the column's ``png``/``jpeg`` format: written unchanged."""


@cache
def _writer_class() -> type:
    """MDSWriter that writes :class:`Encoded` values of image columns as they are (streaming imported lazily)."""
    import numpy as np
    from streaming import MDSWriter
    from streaming.base.format.mds.encodings import mds_encode

    class Writer(MDSWriter):
        def encode_sample(self, sample: dict[str, Any]) -> bytes:  # as MDSWriter's, plus the pass-through
            sizes, data = [], []
            for key, encoding, size in zip(self.column_names, self.column_encodings, self.column_sizes,
                                           strict=True):
                value = sample[key]
                if isinstance(value, Encoded) and encoding in IMAGE_ENCODINGS:
                    datum = bytes(value)
                else:
                    datum = mds_encode(encoding, value)
                if size is None:
                    sizes.append(len(datum))
                elif size != len(datum):
                    raise KeyError(f"column {key!r}: {len(datum)} bytes, but {encoding} is fixed at {size}")
                data.append(datum)
            return np.array(sizes, np.uint32).tobytes() + b"".join(data)

    return Writer


def write_mds(out_dir: str | Path, columns: dict[str, str], rows: Iterable[dict[str, Any]],
              size_limit: int | str = 1 << 26) -> int:
    """Write ``rows`` as MDS shards under ``out_dir`` and record their hashes; return the row count.

    ``rows`` is consumed lazily (a generator streams: only the open shard is held in memory).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with _writer_class()(out=str(out), columns=columns, size_limit=size_limit) as writer:
        for row in rows:
            writer.write(row)
            n += 1
    record_hashes(out)
    return n


def _shard_names(index: dict[str, Any]) -> list[str]:
    names = []
    for shard in index["shards"]:
        names.append(shard["raw_data"]["basename"])
        if shard.get("zip_data"):
            names.append(shard["zip_data"]["basename"])
    return names


def read_index(root: str | Path) -> dict[str, Any]:
    """The ``index.json`` of an MDS directory (InputError naming the file if missing or unreadable)."""
    path = Path(root) / INDEX
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not an MDS dataset (no {INDEX})") from None
    except ValueError as exc:
        raise InputError(f"{path}: unreadable MDS index: {exc}") from exc


def record_hashes(root: str | Path) -> dict[str, str]:
    """sha256 every shard named in ``root/index.json`` into ``root/shard_hashes.json``."""
    root = Path(root)
    hashes = {name: file_sha256(root / name) for name in _shard_names(read_index(root))}
    atomic_write_json(root / HASHES, hashes)
    return hashes


def verify_shards(root: str | Path) -> int:
    """Check every shard against the hashes recorded at write time; return the shard count.

    Raises InputError naming the first missing or corrupt shard.
    """
    root = Path(root)
    path = root / HASHES
    if not path.is_file():
        raise InputError(f"{path}: no recorded shard hashes; cannot verify {root}")
    recorded = json.loads(path.read_text(encoding="utf-8"))
    for name in _shard_names(read_index(root)):
        file = root / name
        if not file.is_file():
            raise InputError(f"{file}: shard listed in {INDEX} is missing")
        if recorded.get(name) != file_sha256(file):
            raise InputError(f"{file}: sha256 does not match the hash recorded at write time (corrupt shard)")
    return len(recorded)


def merge_groups(root: str | Path, groups: list[str], layout: str = "nested") -> int:
    """Join finished group directories under ``root`` into one dataset; return the shard count."""
    root = Path(root)
    shards, hashes = [], {}
    for group in groups:
        gdir = root / group
        index = read_index(gdir)
        recorded = json.loads((gdir / HASHES).read_text(encoding="utf-8"))
        for shard in index["shards"]:
            for key in ("raw_data", "zip_data"):
                part = shard.get(key)
                if not part:
                    continue
                old = part["basename"]
                if layout == "flat":
                    new = f"g{group.split('/')[-1]}.{old}"
                    os.replace(gdir / old, root / new)
                else:
                    new = f"{group}/{old}"
                part["basename"] = new
                hashes[new] = recorded[old]
            shards.append(shard)
        if layout == "flat":
            shutil.rmtree(gdir)
    atomic_write_json(root / INDEX, {"version": 2, "shards": shards})
    atomic_write_json(root / HASHES, hashes)
    if layout == "flat" and (root / "groups").is_dir() and not any((root / "groups").iterdir()):
        (root / "groups").rmdir()
    return len(shards)


def open_dataset(remote: str | Path, cache_dir: str | Path, **kwargs: Any):  # noqa: ANN201 - StreamingDataset
    """A StreamingDataset reading ``remote`` (an artifact, never written to) through ``cache_dir``.

    The artifact is the *remote*, so streaming copies shards into its own cache instead of writing
    next to the published files (which would change the artifact's digest). ``cache_dir`` must be
    unique per open dataset in a process.
    """
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()
    return StreamingDataset(remote=str(remote), local=str(cache_dir), shuffle=False, **kwargs)


def iter_samples(remote: str | Path, cache_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Every sample of an MDS dataset in order (verified first), then the cache is removed."""
    verify_shards(remote)
    ds = open_dataset(remote, cache_dir)
    try:
        for i in range(ds.num_samples):
            yield ds[i]
    finally:
        del ds
        shutil.rmtree(cache_dir, ignore_errors=True)
