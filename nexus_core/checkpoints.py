"""Checkpoints, one format for every trainer: ``<root>/checkpoint-<step>/`` directories, trusted only
once a completion marker is written after everything else in them.

The LLM stages let transformers' Trainer write the directory and mark it from a callback; the flux
trainer writes its accelerate state and marks it itself. Resume always takes :func:`latest`; a
directory without the marker (a kill mid-write) is never resumed from and is removed. Old checkpoints
are rotated out (:func:`rotate`) only after the newest is marked, so a kill at any moment leaves one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from nexus_core.artifacts import atomic_write_text

COMPLETE_MARKER = ".nexus_complete"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_path(root: str | Path, step: int) -> Path:
    """``<root>/checkpoint-<step>``."""
    return Path(root) / f"checkpoint-{step}"


def mark_complete(path: str | Path, step: int, method: str | None = None) -> None:
    """Declare a checkpoint finished (written last, atomically); ``method`` (an LLM stage's: sft, dpo,
    ...) is recorded so an explicit ``resume_from`` can refuse another method's checkpoint."""
    text = json.dumps({"step": step, "method": method}) if method else str(step)
    atomic_write_text(Path(path) / COMPLETE_MARKER, text)


def marker(path: str | Path) -> dict[str, object] | None:
    """What a checkpoint's completion marker records (``step``, and ``method`` when known), or None
    when the checkpoint is not finished."""
    try:
        text = (Path(path) / COMPLETE_MARKER).read_text().strip()
    except OSError:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {"step": data}


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


def rotate(root: str | Path, total_limit: int | None, keep: str | Path | None = None) -> list[Path]:
    """Delete the oldest finished checkpoints beyond ``total_limit``; return what was removed.
    ``keep`` (the best checkpoint, when a trainer tracks one) is never removed and does not count
    against the limit, so the newest ``total_limit`` stay too.

    Call it only after marking the newest one, so a kill at any moment leaves a finished checkpoint.
    """
    if not total_limit:
        return []
    kept = Path(keep).resolve() if keep else None
    found = [(s, p) for s, p in complete(root, remove_partial=False) if p.resolve() != kept]
    removed = [p for _, p in found[: max(0, len(found) - total_limit)]]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed
