"""Checkpoints, one format for every trainer: ``<root>/checkpoint-<step>/`` directories, trusted only
once a completion marker is written after everything else in them.

The LLM stages let transformers' Trainer write the directory and mark it from a callback; the flux
trainer writes its accelerate state and marks it itself. Resume always takes :func:`latest`; a
directory without the marker (a kill mid-write) is never resumed from and is removed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from nexus_core.artifacts import atomic_write_text

COMPLETE_MARKER = ".nexus_complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(root: str | Path, step: int) -> Path:
    """``<root>/checkpoint-<step>``."""
    return Path(root) / f"checkpoint-{step}"


def mark_complete(path: str | Path, step: int) -> None:
    """Declare a checkpoint finished (written last, atomically)."""
    atomic_write_text(Path(path) / COMPLETE_MARKER, str(step))


def complete(root: str | Path, remove_partial: bool = True) -> list[tuple[int, Path]]:
    """``(step, path)`` of every finished checkpoint under ``root``, oldest first; unfinished ones
    (no marker: a kill mid-write) are deleted unless ``remove_partial`` is False."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _CKPT.match(child.name)
        if not m or not child.is_dir():
            continue
        if (child / COMPLETE_MARKER).is_file():
            found.append((int(m.group(1)), child))
        elif remove_partial:
            shutil.rmtree(child, ignore_errors=True)
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    """The newest finished checkpoint under ``root``, or None."""
    found = complete(root)
    return found[-1][1] if found else None


def rotate(root: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest finished checkpoints beyond ``total_limit``; return what was removed.

    Call it only after marking the newest one, so a kill at any moment leaves a finished checkpoint.
    """
    if not total_limit:
        return []
    found = complete(root, remove_partial=False)
    removed = [p for _, p in found[: max(0, len(found) - total_limit)]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
