"""What every GPU-cloud REST client shares: the instance record, the errors, the API key rule.

A provider client launches, reads, lists and terminates machines through the provider's documented
REST API. The worker (infra/workers/gpu.py) only sees this interface, so Lambda and RunPod differ
in one small module each.

Secrets: the API key is read from an environment variable whose NAME is configurable; error
messages name that variable and never contain its value, and clients never log request headers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

#: Every machine Nexus launches is named with this prefix followed by the Prefect flow run id,
#: so a reaper can find its machines (and only its machines) after a worker crash.
LABEL_PREFIX = "nexus-"


def machine_name(flow_run_id: str, attempt: int = 1) -> str:
    """``nexus-<flow run id>`` for a run's first submission, ``nexus-<flow run id>-<n>`` for its n-th.

    A suspended run that is resumed is submitted again and gets a fresh machine; the number keeps
    its name apart from the first machine's, and tells the reaper which machine is the current one.
    """
    return f"{LABEL_PREFIX}{flow_run_id}" + (f"-{attempt}" if attempt > 1 else "")


def parse_machine_name(name: str) -> tuple[str, int] | None:
    """``(flow run id, attempt)`` from a name made by :func:`machine_name`; None if not a Nexus name."""
    if not name.startswith(LABEL_PREFIX):
        return None
    rest = name[len(LABEL_PREFIX):]
    run_id, sep, attempt = rest[:36], rest[36:37], rest[37:]
    if sep == "-" and attempt.isdigit():
        try:
            UUID(run_id)
        except ValueError:
            return rest, 1
        return run_id, int(attempt)
    return rest, 1


class ProviderError(RuntimeError):
    """A provider API call failed for a reason other than capacity."""


class CapacityError(ProviderError):
    """The provider has no capacity for this GPU type in this region right now (try the next one)."""


class UnknownGPUTypeError(ProviderError):
    """The job template names a GPU type the provider does not offer."""


class MissingAPIKeyError(ProviderError):
    """The environment variable holding the provider API key is not set (named, never printed)."""


@dataclass
class Instance:
    """One machine or pod as the provider reports it, reduced to what the worker needs."""

    id: str
    name: str
    phase: str  # pending | running | ended  (provider statuses mapped by each client)
    gpu_type: str | None = None
    region: str | None = None
    raw_status: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flow_run_id(self) -> str | None:
        """The Prefect flow run this machine was launched for, if Nexus launched it."""
        parsed = parse_machine_name(self.name)
        return parsed[0] if parsed else None

    @property
    def attempt(self) -> int:
        """Which submission of its flow run this machine serves (1 = the first)."""
        parsed = parse_machine_name(self.name)
        return parsed[1] if parsed else 1


@dataclass
class LaunchSpec:
    """What to launch: one GPU type in one region (or data centre), the image, and how to run it."""

    name: str
    gpu_type: str
    region: str | None
    image: str
    command: str
    env: dict[str, str]
    disk_gb: int
    gpu_count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


class GPUCloud(Protocol):
    """The subset of a provider API the worker uses."""

    provider: str

    async def offered_gpu_types(self) -> dict[str, list[str]]:
        """GPU type → regions where it currently has capacity (empty list: offered, none free)."""
        ...

    async def launch(self, spec: LaunchSpec) -> str:
        """Launch one machine and return its id; CapacityError when none is free."""
        ...

    async def get(self, instance_id: str) -> Instance | None:
        """The machine, or None if the provider no longer knows it."""
        ...

    async def list(self) -> list[Instance]:
        """Every machine of the account that is not yet gone."""
        ...

    async def terminate(self, instance_id: str) -> None:
        """Terminate (stop billing for) one machine; a machine already gone is not an error."""
        ...

    async def aclose(self) -> None:
        """Close the HTTP client."""
        ...


def api_key_from_env(var: str, provider: str) -> str:
    """The API key from environment variable ``var``; a clear error naming ``var`` if unset."""
    value = os.environ.get(var, "").strip()
    if not value:
        raise MissingAPIKeyError(
            f"{provider}: environment variable {var} is not set; export the {provider} API key as {var} "
            "in the worker's environment (it is never written to job templates, logs or manifests)")
    return value


def scrub(text: str, secret: str) -> str:
    """``text`` with any occurrence of ``secret`` replaced, for error bodies that echo requests."""
    return text.replace(secret, "***") if secret else text
