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
    # rank from the Indexed Job's completion index; rank 0's DNS name and the handshake dir from the job's name
    assert [e["name"] for e in c["env"]] == ["NEXUS_NODE_RANK", "NEXUS_JOB_NAME", "NEXUS_MAIN_ADDR",
                                             "NEXUS_MULTINODE_DIR"]
    # Computed env goes through the job configuration's env dict, which Prefect coerces to strings
    # before the worker writes it into the container (Kubernetes rejects numeric env values).
    env = BaseJobConfiguration(env=cfg["env"]).env
    assert env["NEXUS_NNODES"] == "2" and env["NEXUS_GPUS_PER_NODE"] == "8"
    assert env["NEXUS_DATA"] == "/mnt/nexus/data" and env["NEXUS_WORK"] == "/mnt/nexus/work"
    assert "args" not in c        # unset command: the Kubernetes worker fills in the flow-run command
    assert cfg["namespace"] == job["metadata"]["namespace"] == "tenant-nexus"


def pod_env(cfg: dict, index: int, job_name: str) -> dict[str, str]:
    """The environment the kubelet gives pod ``index`` of the rendered Job named ``job_name``: the job
    configuration's env (which the Prefect worker puts first), then the container's own entries, with
    downward-API fields resolved and ``$(VAR)`` references to earlier entries expanded, plus the
    ``JOB_COMPLETION_INDEX`` the Job controller sets."""
    import re

    from prefect.workers.base import BaseJobConfiguration

    fields = {"metadata.annotations['batch.kubernetes.io/job-completion-index']": str(index),
              "metadata.labels['batch.kubernetes.io/job-name']": job_name}
    env = dict(BaseJobConfiguration(env=cfg["env"]).env)
    for entry in cfg["job_manifest"]["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "valueFrom" in entry:
            env[entry["name"]] = fields[entry["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            env[entry["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), entry["value"])
    return {**env, "JOB_COMPLETION_INDEX": str(index)}


def test_two_node_job_has_headless_service_rank_env_and_only_rank0_runs_the_flow(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    from infra.coreweave.render import render_manifests

    values = {"nodes": 2, "gpus": 8, "shared_mount_path": str(tmp_path / "shared")}
    service, job = render_manifests(values)
    cfg = render(values)
    pod = job["spec"]["template"]
    # Headless Service: the pods' subdomain, same namespace, selects the Job's pods, the rendezvous port.
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["metadata"]["name"] == pod["spec"]["subdomain"] == "nexus-nodes"
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"] == [{"name": "rendezvous", "port": 29500}]
    # ... the same Service that shared-pvc.yaml applies once per namespace.
    shipped = [d for d in yaml.safe_load_all((Path(__file__).parents[2] / "infra/coreweave/shared-pvc.yaml").read_text())
               if d["kind"] == "Service"]
    assert shipped == [{**service, "metadata": {k: v for k, v in service["metadata"].items() if k != "namespace"}}]
    assert render_manifests({"nodes": 1})[0]["kind"] == "Job"  # one node: no Service needed
    # Every pod starts the Nexus entry point; the worker's flow-run command follows `--` as args.
    container = pod["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "nexus_core.train.node_agent", "--"]
    assert "args" not in container  # the Kubernetes worker fills in `prefect flow-run execute`
    # Rank env as the kubelet resolves it for each pod of job "nexus-abcde".
    envs = [pod_env(cfg, i, "nexus-abcde") for i in range(2)]
    assert [e["NEXUS_NODE_RANK"] for e in envs] == ["0", "1"]
    assert {e["NEXUS_NNODES"] for e in envs} == {str(job["spec"]["completions"])} == {str(job["spec"]["parallelism"])}
    assert {e["NEXUS_MAIN_ADDR"] for e in envs} == {"nexus-abcde-0.nexus-nodes"}  # <hostname>.<subdomain>
    assert {e["NEXUS_MAIN_PORT"] for e in envs} == {"29500"}
    assert {e["NEXUS_MULTINODE_DIR"] for e in envs} == {str(tmp_path / "shared/multinode/nexus-abcde")}
    # Run both pods' entry point with a stand-in for the flow-run command: only rank 0 runs it, and
    # rank 1 (the node agent) exits once rank 0's run has ended.
    flow_run = [sys.executable, "-c", "import os, pathlib; "
                "pathlib.Path(os.environ['MARKERS'], 'ran-on-' + os.environ['NEXUS_NODE_RANK']).touch()"]
    (tmp_path / "markers").mkdir()

    def start(i: int) -> subprocess.Popen[str]:
        env = {**os.environ, **envs[i], "MARKERS": str(tmp_path / "markers"), "NEXUS_HOME": str(tmp_path / f"home{i}")}
        cmd = [sys.executable, *container["command"][1:], *flow_run]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    rank1 = start(1)
    rank0 = start(0)
    out0, _ = rank0.communicate(timeout=60)
    out1, _ = rank1.communicate(timeout=60)
    assert (rank0.returncode, rank1.returncode) == (0, 0), out0 + out1
    assert sorted(p.name for p in (tmp_path / "markers").iterdir()) == ["ran-on-0"]
    assert "not running the flow run (only rank 0 does)" in out1 and "rank 0's flow run ended (exit 0)" in out1


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
        elif kind == "process":
            from prefect.workers.process import ProcessVariables

            jv.pop("image")
            assert set(jv) <= set(ProcessVariables.model_fields), set(jv) - set(ProcessVariables.model_fields)
            ProcessVariables.model_validate(jv)
        else:
            model = {"nexus-lambda": LambdaVariables, "nexus-runpod": RunPodVariables}[kind]
            assert set(jv) <= set(model.model_fields), set(jv) - set(model.model_fields)
            model.model_validate(jv)
        assert (repo / dep["entrypoint"].split(":")[0]).is_file()
        seen.add(kind)
    assert seen == {"nexus-lambda", "nexus-runpod", "kubernetes", "process"}


def test_remote_lifecycle_sections_name_remote_deployments_of_their_flows():
    """The lifecycle deployment that runs its sections on pools names deployments that exist in the same
    file, each of the section's own flow (what LifecycleConfig validates), CPU sections on a process pool."""
    from pathlib import Path

    import yaml

    from flows.lifecycle import LifecycleConfig
    from flows.sections import SECTION_FLOWS

    repo = Path(__file__).resolve().parents[2]
    doc = yaml.safe_load((repo / "infra" / "prefect.remote.yaml").read_text())
    names = {f"{d['entrypoint'].rsplit(':', 1)[1]}/{d['name']}": d for d in doc["deployments"]}
    pools = names["lifecycle/pools"]["parameters"]["cfg"]["deployments"]
    assert set(pools) == set(SECTION_FLOWS)
    cfg = LifecycleConfig.model_validate(names["lifecycle/pools"]["parameters"]["cfg"])
    for section, deployment in pools.items():
        assert getattr(cfg.deployments, section) == deployment
        assert deployment in names, deployment
    assert names[pools["distill"]]["work_pool"]["name"] == "cpu"
    assert {names[pools[s]]["work_pool"]["name"] for s in ("train", "evaluate", "compress")} <= {
        "gpu-lambda", "gpu-runpod", "gpu-coreweave"}
