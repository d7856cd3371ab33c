"""Errors Nexus raises on purpose. Each names the file, row or key at fault."""

from __future__ import annotations


class NexusError(Exception):
    """Base of every error Nexus raises deliberately; the CLI prints it without a traceback."""


class ConfigError(NexusError):
    """A config file or override is invalid. Holds every problem found, not just the first."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        super().__init__(head + ":\n" + "\n".join(f"  - {p}" for p in problems))


class InputError(NexusError):
    """An input file or table is unusable: missing, unreadable, wrong columns, bad line."""


class StepError(NexusError):
    """A step failed for a reason the user can act on (not a per-row failure, which is data)."""


class Killed(StepError):
    """A step's training process was ended by a signal (SIGKILL from the OOM killer or an operator, a
    pre-empted node): its MLflow run is marked KILLED, not FAILED, and a re-run resumes from its checkpoints."""
