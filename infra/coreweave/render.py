"""Render the CoreWeave base job template to the Kubernetes Job a flow run would get.

    python -m infra.coreweave.render gpus=8 nodes=2 image=ghcr.io/org/nexus-gpu:1.2

Uses Prefect's own templating (``apply_values``) exactly as the Kubernetes worker does, after
checking the values against the template's variable schema (a wrong type is one clear error).
Register the pool with:
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


def main(argv: list[str] | None = None) -> int:
    """Print the rendered Job manifest as YAML."""
    args = sys.argv[1:] if argv is None else argv
    try:
        config = render(parse_overrides(args))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(yaml.safe_dump(config["job_manifest"], sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
