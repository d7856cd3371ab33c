"""Lambda Cloud API client (https://cloud.lambda.ai/api/v1), the documented subset Nexus uses.

- ``GET  /instance-types``                  → ``{"data": {name: {"instance_type": {...},
                                               "regions_with_capacity_available": [{"name": ...}]}}}``
- ``POST /instance-operations/launch``      ``{region_name, instance_type_name, ssh_key_names,
                                               file_system_names, quantity, name, user_data, tags}``
                                             → ``{"data": {"instance_ids": [...]}}``
- ``GET  /instances`` / ``GET /instances/{id}`` → ``{"data": [...]}`` / ``{"data": {...}}``
- ``POST /instance-operations/terminate``   ``{instance_ids}`` → ``{"data": {"terminated_instances": [...]}}``
- errors: ``{"error": {"code": "instance-operations/launch/insufficient-capacity", "message": ...}}``

Instance statuses: booting, active, unhealthy, terminating, terminated. Lambda machines are VMs, so
the flow run is started by a cloud-init ``user_data`` script that runs the job image with Docker.
"""

from __future__ import annotations

import shlex

from infra.providers.base import (
    CapacityError,
    Instance,
    LaunchSpec,
    ProviderError,
    parse_machine_name,
)
from infra.providers.http import JsonAPI

DEFAULT_URL = "https://cloud.lambda.ai/api/v1"
_PHASES = {"booting": "pending", "active": "running", "unhealthy": "running",
           "terminating": "ended", "terminated": "ended"}


def user_data_script(spec: LaunchSpec) -> str:
    """cloud-init script: write the env file, run the job image with all GPUs, keep its exit code."""
    env_lines = "\n".join(f"{k}={v}" for k, v in sorted(spec.env.items()) if "\n" not in v)
    return (
        "#!/bin/bash\nset -u\n"
        "cat > /root/nexus.env <<'NEXUS_ENV'\n" + env_lines + "\nNEXUS_ENV\n"
        f"docker pull {shlex.quote(spec.image)}\n"
        f"docker run --gpus all --rm --ipc=host --env-file /root/nexus.env {shlex.quote(spec.image)} "
        f"bash -lc {shlex.quote(spec.command)}\n"
        "echo $? > /root/nexus.exit_code\n"
    )


class LambdaCloud:
    """Async client for the Lambda Cloud instance API."""

    provider = "lambda"

    def __init__(self, api_key: str, base_url: str = DEFAULT_URL, *, ssh_key_name: str | None = None,
                 file_system_names: list[str] | None = None, retries: int = 3, backoff_s: float = 1.0):
        self.api = JsonAPI(base_url, api_key, "lambda", retries=retries, backoff_s=backoff_s)
        self.ssh_key_name = ssh_key_name
        self.file_system_names = file_system_names or []

    def _fail(self, what: str, resp) -> ProviderError:  # noqa: ANN001
        try:
            err = resp.json().get("error", {})
        except ValueError:
            err = {}
        code, message = err.get("code", ""), err.get("message") or self.api.error_text(resp)
        cls = CapacityError if "insufficient-capacity" in code else ProviderError
        return cls(f"lambda: {what} failed (HTTP {resp.status_code} {code}): {message}")

    async def offered_gpu_types(self) -> dict[str, list[str]]:
        """Instance type name → regions that have capacity now."""
        resp = await self.api.request("GET", "instance-types")
        if resp.status_code != 200:
            raise self._fail("list instance types", resp)
        return {name: [r["name"] for r in item.get("regions_with_capacity_available", [])]
                for name, item in resp.json()["data"].items()}

    async def launch(self, spec: LaunchSpec) -> str:
        """Launch one instance of ``spec.gpu_type`` in ``spec.region``; return its id."""
        body = {"region_name": spec.region, "instance_type_name": spec.gpu_type, "quantity": 1,
                "name": spec.name, "ssh_key_names": [self.ssh_key_name] if self.ssh_key_name else [],
                "file_system_names": self.file_system_names, "user_data": user_data_script(spec),
                "tags": [{"key": "nexus", "value": (parse_machine_name(spec.name) or (spec.name, 1))[0]}]}
        resp = await self.api.request("POST", "instance-operations/launch", json=body)
        if resp.status_code != 200:
            raise self._fail(f"launch {spec.gpu_type} in {spec.region}", resp)
        return resp.json()["data"]["instance_ids"][0]

    @staticmethod
    def _instance(item: dict) -> Instance:
        status = item.get("status", "")
        return Instance(id=item["id"], name=item.get("name") or "", phase=_PHASES.get(status, "pending"),
                        gpu_type=(item.get("instance_type") or {}).get("name"),
                        region=(item.get("region") or {}).get("name"), raw_status=status,
                        extra={"ip": item.get("ip")})

    async def get(self, instance_id: str) -> Instance | None:
        """The instance, or None once Lambda no longer knows it."""
        resp = await self.api.request("GET", f"instances/{instance_id}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(f"get instance {instance_id}", resp)
        return self._instance(resp.json()["data"])

    async def list(self) -> list[Instance]:
        """Every instance of the account."""
        resp = await self.api.request("GET", "instances")
        if resp.status_code != 200:
            raise self._fail("list instances", resp)
        return [self._instance(i) for i in resp.json()["data"]]

    async def terminate(self, instance_id: str) -> None:
        """Terminate one instance; one that is already gone is fine."""
        resp = await self.api.request("POST", "instance-operations/terminate",
                                      json={"instance_ids": [instance_id]})
        if resp.status_code == 404:
            return
        if resp.status_code != 200:
            raise self._fail(f"terminate {instance_id}", resp)

    async def aclose(self) -> None:
        """Close the HTTP client."""
        await self.api.aclose()
