"""RunPod client: REST v1 (https://rest.runpod.io/v1) for pods, GraphQL for the GPU type list.

- ``POST   /pods``           ``{name, imageName, gpuTypeIds, gpuCount, cloudType, dataCenterIds,
                               containerDiskInGb, volumeInGb, env, dockerStartCmd}`` → 201 pod
- ``GET    /pods``  ``GET /pods/{podId}``   → pods / pod (``id, name, desiredStatus, runtime, ...``)
- ``DELETE /pods/{podId}``   terminate (204)
- ``POST   https://api.runpod.io/graphql``  ``query { gpuTypes { id displayName } }``

``desiredStatus`` is RUNNING, EXITED or TERMINATED; a RUNNING pod whose ``runtime`` is still null is
being provisioned. When no machine matches, RunPod answers with the message "There are no longer
any instances available with the requested specifications": that is a capacity error.
"""

from __future__ import annotations

from infra.providers.base import CapacityError, Instance, LaunchSpec, ProviderError
from infra.providers.http import JsonAPI

DEFAULT_URL = "https://rest.runpod.io/v1"
DEFAULT_GRAPHQL_URL = "https://api.runpod.io/graphql"
_CAPACITY_MARKERS = ("no longer any instances available", "no instances available",
                     "not enough capacity")


class RunPod:
    """Async client for RunPod pods."""

    provider = "runpod"

    def __init__(self, api_key: str, base_url: str = DEFAULT_URL, graphql_url: str = DEFAULT_GRAPHQL_URL,
                 *, cloud_type: str = "SECURE", retries: int = 3, backoff_s: float = 1.0):
        self.api = JsonAPI(base_url, api_key, "runpod", retries=retries, backoff_s=backoff_s)
        self.graphql = JsonAPI(graphql_url, api_key, "runpod", retries=retries, backoff_s=backoff_s)
        self.cloud_type = cloud_type

    def _fail(self, what: str, resp) -> ProviderError:  # noqa: ANN001
        text = self.api.error_text(resp)
        cls = CapacityError if any(m in text.lower() for m in _CAPACITY_MARKERS) else ProviderError
        return cls(f"runpod: {what} failed (HTTP {resp.status_code}): {text}")

    async def offered_gpu_types(self) -> dict[str, list[str]]:
        """GPU type id → [] (RunPod places pods across data centres itself; capacity shows at launch)."""
        resp = await self.graphql.request("POST", "", json={"query": "query { gpuTypes { id displayName } }"})
        if resp.status_code != 200 or "errors" in resp.json():
            raise self._fail("list GPU types", resp)
        return {g["id"]: [] for g in resp.json()["data"]["gpuTypes"]}

    async def launch(self, spec: LaunchSpec) -> str:
        """Create one pod of ``spec.gpu_type`` (in data centre ``spec.region`` if given); return its id."""
        body = {"name": spec.name, "imageName": spec.image, "gpuTypeIds": [spec.gpu_type],
                "gpuCount": spec.gpu_count, "cloudType": self.cloud_type,
                "containerDiskInGb": spec.disk_gb, "volumeInGb": int(spec.extra.get("volume_gb", 0)),
                "env": spec.env, "dockerStartCmd": ["bash", "-lc", spec.command]}
        if spec.region:
            body["dataCenterIds"] = [spec.region]
        resp = await self.api.request("POST", "pods", json=body)
        if resp.status_code not in (200, 201):
            raise self._fail(f"create pod {spec.gpu_type} in {spec.region or 'any data centre'}", resp)
        return resp.json()["id"]

    @staticmethod
    def _instance(pod: dict) -> Instance:
        status = pod.get("desiredStatus", "")
        if status in ("EXITED", "TERMINATED"):
            phase = "ended"
        else:
            phase = "running" if pod.get("runtime") else "pending"
        machine = pod.get("machine") or {}
        return Instance(id=pod["id"], name=pod.get("name") or "", phase=phase,
                        gpu_type=(pod.get("gpu") or {}).get("id") or machine.get("gpuTypeId"),
                        region=machine.get("dataCenterId"), raw_status=status)

    async def get(self, instance_id: str) -> Instance | None:
        """The pod, or None once RunPod no longer knows it."""
        resp = await self.api.request("GET", f"pods/{instance_id}")
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise self._fail(f"get pod {instance_id}", resp)
        return self._instance(resp.json())

    async def list(self) -> list[Instance]:
        """Every pod of the account."""
        resp = await self.api.request("GET", "pods")
        if resp.status_code != 200:
            raise self._fail("list pods", resp)
        return [self._instance(p) for p in resp.json()]

    async def terminate(self, instance_id: str) -> None:
        """Delete (terminate) one pod; one that is already gone is fine."""
        resp = await self.api.request("DELETE", f"pods/{instance_id}")
        if resp.status_code not in (200, 204, 404):
            raise self._fail(f"terminate pod {instance_id}", resp)

    async def aclose(self) -> None:
        """Close the HTTP clients."""
        await self.api.aclose()
        await self.graphql.aclose()
