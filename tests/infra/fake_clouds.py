"""A loopback HTTP server implementing the documented subset of the Lambda Cloud and RunPod APIs.

Routes (bearer auth checked on every call):

- Lambda, under ``/lambda/api/v1``: ``GET instance-types``, ``POST instance-operations/launch``,
  ``GET instances``, ``GET instances/{id}``, ``POST instance-operations/terminate``.
- RunPod: ``POST /runpod/graphql`` (``gpuTypes``), and under ``/runpod/v1``: ``POST pods``,
  ``GET pods``, ``GET pods/{id}``, ``DELETE pods/{id}``.

Knobs for fault injection: which (type, region) pairs have capacity, how many status reads an
instance stays booting (``boot_after``; ``None`` = never boots), and direct state edits. Every
request is logged (method, path, JSON body) so tests can prove what was, or was not, launched.
"""

from __future__ import annotations

import itertools
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_ids = itertools.count(1)


class FakeClouds:
    """State of both fake providers plus the server; use as a context manager."""

    def __init__(self, api_key: str = "test-key-123"):
        self.api_key = api_key
        self.lock = threading.Lock()
        self.log: list[tuple[str, str, Any]] = []
        # Lambda: instance type -> regions advertised; capacity: pairs that really launch.
        self.lambda_types: dict[str, list[str]] = {"gpu_1x_a10": ["us-east-1"],
                                                   "gpu_1x_h100_pcie": ["us-east-1", "us-west-1"],
                                                   "gpu_1x_a100_sxm4": ["us-west-1"]}
        self.lambda_capacity: set[tuple[str, str]] = {("gpu_1x_a100_sxm4", "us-west-1")}
        self.instances: dict[str, dict] = {}
        # RunPod: GPU type ids offered; capacity: (gpu, data centre or None = any).
        self.runpod_types = ["NVIDIA H100 80GB HBM3", "NVIDIA A100 80GB PCIe", "NVIDIA RTX A6000"]
        self.runpod_capacity: set[tuple[str, str | None]] = {("NVIDIA A100 80GB PCIe", None)}
        self.pods: dict[str, dict] = {}
        self.boot_after: int | None = 1   # status reads before an instance/pod is running
        self._reads: dict[str, int] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> FakeClouds:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def lambda_url(self) -> str:
        return f"{self.url}/lambda/api/v1"

    @property
    def runpod_url(self) -> str:
        return f"{self.url}/runpod/v1"

    @property
    def runpod_graphql_url(self) -> str:
        return f"{self.url}/runpod/graphql"

    # -- helpers for tests -------------------------------------------------------------------
    def calls(self, method: str, fragment: str) -> list[Any]:
        """Bodies of logged requests whose path contains ``fragment``."""
        return [b for m, p, b in self.log if m == method and fragment in p]

    def add_instance(self, name: str, status: str = "active", type_: str = "gpu_1x_a10",
                     region: str = "us-east-1") -> str:
        iid = f"i-{next(_ids)}"
        self.instances[iid] = {"id": iid, "name": name, "status": status, "ip": "10.0.0.1",
                               "instance_type": {"name": type_}, "region": {"name": region}}
        return iid

    def live(self) -> list[dict]:
        """Lambda instances and RunPod pods still billed (not terminated)."""
        return ([i for i in self.instances.values() if i["status"] not in ("terminated", "terminating")]
                + [p for p in self.pods.values() if p["desiredStatus"] != "TERMINATED"])

    def _advance(self, key: str, obj: dict, booting: str, running: str, field: str) -> None:
        if obj[field] != booting:
            return
        n = self._reads[key] = self._reads.get(key, 0) + 1
        if self.boot_after is not None and n > self.boot_after:
            obj[field] = running
            if field == "desiredStatus":
                obj["runtime"] = {"uptimeInSeconds": 1}

    # -- HTTP ----------------------------------------------------------------------------------
    def _handler(self) -> type[BaseHTTPRequestHandler]:
        clouds = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _send(self, code: int, body: Any = None) -> None:
                data = b"" if body is None else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _dispatch(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null") if length else None
                path = self.path.split("?")[0].rstrip("/")
                with clouds.lock:
                    clouds.log.append((method, path, body))
                    if self.headers.get("Authorization") != f"Bearer {clouds.api_key}":
                        if path.startswith("/lambda"):
                            return self._send(401, {"error": {"code": "global/invalid-api-key",
                                                              "message": "API key was invalid, expired, or deleted."}})
                        return self._send(401, {"error": "Unauthorized"})
                    if path.startswith("/lambda/api/v1/"):
                        return self._lambda(method, path[len("/lambda/api/v1/"):], body)
                    if path == "/runpod/graphql":
                        return self._send(200, {"data": {"gpuTypes": [
                            {"id": g, "displayName": g.split()[-1]} for g in clouds.runpod_types]}})
                    if path.startswith("/runpod/v1/"):
                        return self._runpod(method, path[len("/runpod/v1/"):], body)
                    return self._send(404, {"error": "no route"})

            def _lambda(self, method: str, route: str, body: Any) -> None:
                if method == "GET" and route == "instance-types":
                    return self._send(200, {"data": {
                        name: {"instance_type": {"name": name, "description": name, "price_cents_per_hour": 100},
                               "regions_with_capacity_available": [{"name": r, "description": r} for r in regions]}
                        for name, regions in clouds.lambda_types.items()}})
                if method == "POST" and route == "instance-operations/launch":
                    t, r = body["instance_type_name"], body["region_name"]
                    if t not in clouds.lambda_types:
                        return self._send(400, {"error": {"code": "global/invalid-parameters",
                                                          "message": f"Invalid instance type {t}"}})
                    if (t, r) not in clouds.lambda_capacity:
                        return self._send(400, {"error": {
                            "code": "instance-operations/launch/insufficient-capacity",
                            "message": "Not enough capacity to fulfill launch request."}})
                    iid = clouds.add_instance(body.get("name") or "", "booting", t, r)
                    clouds.instances[iid]["user_data"] = body.get("user_data")
                    return self._send(200, {"data": {"instance_ids": [iid]}})
                if method == "GET" and route == "instances":
                    return self._send(200, {"data": [i for i in clouds.instances.values()
                                                     if i["status"] != "terminated"]})
                if method == "GET" and route.startswith("instances/"):
                    inst = clouds.instances.get(route.split("/", 1)[1])
                    if inst is None:
                        return self._send(404, {"error": {"code": "global/object-does-not-exist",
                                                          "message": "Specified instance does not exist."}})
                    clouds._advance(inst["id"], inst, "booting", "active", "status")
                    return self._send(200, {"data": inst})
                if method == "POST" and route == "instance-operations/terminate":
                    done = []
                    for iid in body["instance_ids"]:
                        if iid not in clouds.instances:
                            return self._send(404, {"error": {"code": "global/object-does-not-exist",
                                                              "message": "Specified instance does not exist."}})
                        clouds.instances[iid]["status"] = "terminated"
                        done.append(clouds.instances[iid])
                    return self._send(200, {"data": {"terminated_instances": done}})
                return self._send(404, {"error": {"code": "global/not-found", "message": route}})

            def _runpod(self, method: str, route: str, body: Any) -> None:
                if method == "POST" and route == "pods":
                    gpu = body["gpuTypeIds"][0]
                    dcs = body.get("dataCenterIds") or [None]
                    if gpu not in clouds.runpod_types:
                        return self._send(400, {"error": f"invalid gpuTypeIds: {gpu}"})
                    if not any((gpu, dc) in clouds.runpod_capacity or (gpu, None) in clouds.runpod_capacity
                               for dc in dcs):
                        return self._send(500, {"error": "create pod: There are no longer any instances "
                                                         "available with the requested specifications. "
                                                         "Please refresh and try again."})
                    pid = f"pod{next(_ids)}"
                    clouds.pods[pid] = {"id": pid, "name": body["name"], "desiredStatus": "RUNNING",
                                        "runtime": None, "imageName": body["imageName"], "env": body.get("env", {}),
                                        "dockerStartCmd": body.get("dockerStartCmd"),
                                        "gpu": {"id": gpu, "count": body.get("gpuCount", 1)},
                                        "machine": {"dataCenterId": dcs[0] or "EU-RO-1"},
                                        "containerDiskInGb": body.get("containerDiskInGb")}
                    return self._send(201, clouds.pods[pid])
                if method == "GET" and route == "pods":
                    return self._send(200, [p for p in clouds.pods.values() if p["desiredStatus"] != "TERMINATED"])
                if route.startswith("pods/"):
                    pod = clouds.pods.get(route.split("/", 1)[1])
                    if pod is None or (method == "GET" and pod["desiredStatus"] == "TERMINATED"):
                        return self._send(404, {"error": "pod not found"})
                    if method == "GET":
                        if pod["desiredStatus"] == "RUNNING" and pod["runtime"] is None:
                            n = clouds._reads[pod["id"]] = clouds._reads.get(pod["id"], 0) + 1
                            if clouds.boot_after is not None and n > clouds.boot_after:
                                pod["runtime"] = {"uptimeInSeconds": 1}
                        return self._send(200, pod)
                    if method == "DELETE":
                        pod["desiredStatus"] = "TERMINATED"
                        return self._send(204)
                return self._send(404, {"error": "no route"})

            def do_GET(self) -> None:  # noqa: N802
                self._dispatch("GET")

            def do_POST(self) -> None:  # noqa: N802
                self._dispatch("POST")

            def do_DELETE(self) -> None:  # noqa: N802
                self._dispatch("DELETE")

        return Handler
