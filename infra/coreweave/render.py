"""Render the CoreWeave base job template to the Kubernetes Job a flow run would get.

    python -m infra.coreweave.render gpus=8 nodes=2 image=ghcr.io/org/nexus-gpu:1.2

Uses Prefect's own templating (``apply_values``) exactly as the Kubernetes worker does, after
checking the values against the template's variable schema (a wrong type is one clear error).
For more than one node it also prints the headless Service that gives the Job's pods their DNS
names (``<job name>-<rank>.<service>``); the Prefect worker creates only the Job, so the Service is
applied once per namespace (it is in ``shared-pvc.yaml``). Register the pool with:
    prefect work-pool create gpu-coreweave --type kubernetes \
        --base-job-template infra/coreweave/base_job_template.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from nexus_core.config import parse_overrides
from nexus_core.errors import ConfigError

TEMPLATE = Path(__file__).with_name("base_job_template.json")


def load_template(path: str | Path = TEMPLATE) -> dict[str, Any]:
    """The base job template as JSON."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def render(values: dict[str, Any] | None = None, template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The job configuration (with ``job_manifest``) for these variable values plus the defaults."""
    import jsonschema
    from prefect.utilities.templating import apply_values

    template = template or load_template()
    schema = template["variables"]
    merged = {k: v["default"] for k, v in schema["properties"].items() if v.get("default") is not None}
    merged.update(values or {})
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(merged), key=lambda e: list(e.path))
    if errors:
        raise ConfigError([f"{'.'.join(map(str, e.path)) or '(top level)'}: {e.message}" for e in errors],
                          str(TEMPLATE))
    return apply_values(template["job_configuration"], merged)


def nodes_service(config: dict[str, Any]) -> dict[str, Any]:
    """The headless Service a rendered multi-node job needs: named as the pods' subdomain, in the
    Job's namespace, selecting the Job's pods by their template labels. ``publishNotReadyAddresses``
    gives a pod its DNS name as soon as it exists, so a node that starts first can already resolve
    rank 0 (it then retries the connection until rank 0 listens)."""
    job = config["job_manifest"]
    pod = job["spec"]["template"]
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": pod["spec"]["subdomain"], "namespace": job["metadata"]["namespace"],
                     "labels": {"app.kubernetes.io/part-of": "nexus"}},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": {"nexus/multinode": pod["metadata"]["labels"]["nexus/multinode"]},
                 "ports": [{"name": "rendezvous", "port": int(config["env"]["NEXUS_MAIN_PORT"])}]},
    }


def render_manifests(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """What a flow run with these values needs in the cluster: the headless Service (more than one
    node) and the Job."""
    config = render(values)
    nodes = int(config["job_manifest"]["spec"]["completions"])
    return ([nodes_service(config)] if nodes > 1 else []) + [config["job_manifest"]]


def main(argv: list[str] | None = None) -> int:
    """Print the rendered manifests (Service for multi-node, then the Job) as YAML documents."""
    args = sys.argv[1:] if argv is None else argv
    try:
        manifests = render_manifests(parse_overrides(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump_all(manifests, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
