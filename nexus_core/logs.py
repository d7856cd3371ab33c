"""Keeping step logs readable: what the spine does so a run's log holds the step's own lines.

Any step that builds a ``datasets`` Dataset (trl's trainers, SFT packaging) makes datasets fingerprint
functions with dill, and dill prints their disassembly; under Prefect's ``log_prints`` that output
became hundreds of log lines per step. :func:`hash_functions_quietly` gives dill the same answer
without printing.
"""

from __future__ import annotations

from typing import Any


def global_names(func: Any, recurse: bool = True) -> list[str]:
    """``dill.detect.nestedglobals`` without printing: the global names a function's code (and, with
    ``recurse``, its nested code) loads or stores, read from ``dis.get_instructions``."""
    import dis

    from dill.detect import code, iscode

    co = code(func)
    if co is None:
        return []
    names = {ins.argval for ins in dis.get_instructions(co) if "_GLOBAL" in ins.opname}
    if recurse:
        for const in co.co_consts:
            if iscode(const):
                names.update(global_names(const))
    return list(names)


def hash_functions_quietly() -> None:
    """Stop the Python bytecode that filled step logs (idempotent; the runner calls it before every step,
    launched training processes at their start).

    trl prepares datasets with ``Dataset.map(fn)``; datasets fingerprints ``fn`` by pickling it with
    dill (``recurse=True``), and dill finds a function's globals by *printing* ``dis.dis(fn)`` while
    ``sys.stdout`` is swapped for a StringIO. Under a Prefect flow with ``log_prints`` the builtin
    ``print`` is patched and sends prints aimed at ``sys.stdout`` to the run log, whatever
    ``sys.stdout`` is at the time, so every hashed function's disassembly became log lines (and dill,
    reading back an empty capture, hashed functions without their globals). Reading the names from
    ``dis.get_instructions`` gives dill the same names without printing, under any print patch and
    without swapping ``sys.stdout`` under other threads.
    """
    import dill.detect

    dill.detect.nestedglobals = global_names
