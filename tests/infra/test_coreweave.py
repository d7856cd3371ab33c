"""The CoreWeave base job template renders, with Prefect's templating, to a valid multi-node GPU Job."""

from __future__ import annotations

import pytest

from infra.coreweave.render import main, render
from nexus_core.errors import ConfigError

# The parts of the batch/v1 Job schema this template relies on (types the API server enforces).
JOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "batch/v1"}, "kind": {"const": "Job"},
        "metadata": {"type": "object", "required": ["namespace"],
                     "properties": {"generateName": {"type": "string"}, "namespace": {"type": "string"},
                                    "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "required": ["template"], "properties": {
            "backoffLimit": {"type": "integer"}, "ttlSecondsAfterFinished": {"type": "integer"},
            "completions": {"type": "integer", "minimum": 1}, "parallelism": {"type": "integer", "minimum": 1},
            "completionMode": {"enum": ["Indexed", "NonIndexed"]},
            "template": {"type": "object", "required": ["spec"], "properties": {"spec": {
                "type": "object", "required": ["containers", "restartPolicy"], "properties": {
                    "restartPolicy": {"enum": ["Never", "OnFailure"]},
                    "containers": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["name", "image"], "properties": {
                            "image": {"type": "string", "minLength": 1},
                            "env": {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
                                "name": {"type": "string"}, "value": {"type": "string"}}}},
                            "resources": {"type": "object", "properties": {
                                "limits": {"type": "object", "additionalProperties": {"type": ["string", "integer"]}},
                                "requests": {"type": "object",
                                             "additionalProperties": {"type": ["string", "integer"]}}}}}}},
                    "volumes": {"type": "array", "items": {"type": "object", "required": ["name"]}}}}}}}}},
}


def test_renders_a_valid_multinode_gpu_job():
    import jsonschema
    from prefect.workers.base import BaseJobConfiguration

    cfg = render({"gpus": 8, "nodes": 2, "image": "ghcr.io/org/nexus-gpu:1.2", "gpu_class": ["H100_NVLINK_80GB"]})
    job = cfg["job_manifest"]
    jsonschema.validate(job, JOB_SCHEMA)
    assert cfg["env"]["NEXUS_NNODES"] == 2
    spec = job["spec"]
    assert (spec["completions"], spec["parallelism"], spec["completionMode"]) == (2, 2, "Indexed")
    pod = spec["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == "ghcr.io/org/nexus-gpu:1.2"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 8 and c["resources"]["requests"]["nvidia.com/gpu"] == 8
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    exprs = {e["key"]: e for e in terms[0]["matchExpressions"]}
    assert exprs["gpu.nvidia.com/class"] == {"key": "gpu.nvidia.com/class", "operator": "In",
                                             "values": ["H100_NVLINK_80GB"]}
    claim = next(v for v in pod["volumes"] if v["name"] == "shared")["persistentVolumeClaim"]["claimName"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "shared")["mountPath"]
    assert claim == "nexus-shared" and mount == "/mnt/nexus"
    assert [e["name"] for e in c["env"]] == ["NEXUS_NODE_RANK"]      # from the Indexed Job's completion index
    # Computed env goes through the job configuration's env dict, which Prefect coerces to strings
    # before the worker writes it into the container (Kubernetes rejects numeric env values).
    env = BaseJobConfiguration(env=cfg["env"]).env
    assert env["NEXUS_NNODES"] == "2" and env["NEXUS_GPUS_PER_NODE"] == "8"
    assert env["NEXUS_DATA"] == "/mnt/nexus/data"
    assert "args" not in c        # unset command: the Kubernetes worker fills in the flow-run command
    assert cfg["namespace"] == job["metadata"]["namespace"] == "tenant-nexus"


def test_wrong_variable_type_is_one_clear_error():
    with pytest.raises(ConfigError) as err:
        render({"gpus": "eight", "nodes": 0})
    msg = str(err.value)
    assert "gpus: 'eight' is not of type 'integer'" in msg and "nodes: 0 is less than the minimum of 1" in msg


def test_cli_prints_the_manifest(capsys):
    assert main(["gpus=4"]) == 0
    assert "nvidia.com/gpu: 4" in capsys.readouterr().out
    assert main(["gpus=lots"]) == 1


def test_remote_prefect_file_job_variables_validate_against_their_pools():
    """infra/prefect.remote.yaml: every deployment's job variables fit its pool's template."""
    from pathlib import Path

    import yaml

    from infra.concurrency import DEFAULT, LimitsConfig
    from infra.workers.lambda_worker import LambdaVariables
    from infra.workers.runpod_worker import RunPodVariables
    from nexus_core.config import load_config

    repo = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((repo / "infra" / "prefect.remote.yaml").read_text())
    pools = load_config(DEFAULT, LimitsConfig).work_pools
    seen = set()
    for dep in doc["deployments"]:
        pool = dep["work_pool"]["name"]
        jv = {**dep["work_pool"]["job_variables"], "image": "registry/nexus-gpu:abc123"}
        jv["env"] = {k: "x" for k in jv["env"]}             # {{ $VAR }} placeholders filled at deploy time
        kind = pools[pool].type
        if kind == "kubernetes":
            render(jv)
        else:
            model = {"nexus-lambda": LambdaVariables, "nexus-runpod": RunPodVariables}[kind]
            assert set(jv) <= set(model.model_fields), set(jv) - set(model.model_fields)
            model.model_validate(jv)
        assert (repo / dep["entrypoint"].split(":")[0]).is_file()
        seen.add(kind)
    assert seen == {"nexus-lambda", "nexus-runpod", "kubernetes"}
