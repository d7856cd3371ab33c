"""Multi-node training: two "nodes" (two process groups on this machine, gloo on CPU) train one model.
Rank 0 goes through the normal step path; rank 1 is the node agent. Plus the handshake's failure paths."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from nexus_core.artifacts import list_versions, raw_ref
from nexus_core.context import StepContext
from nexus_core.errors import StepError
from nexus_core.runner import run_step
from nexus_core.train import node_agent
from nexus_core.train.launch import run_stage
from nexus_core.train.multinode import Nodes, Rendezvous, nodes_from_env, watch_launch
from nexus_core.train.sft import SFTConfig, run_sft

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_sft() -> SFTConfig:
    """The SFT stage of the tiny training preset, cut to 2 steps."""
    train = yaml.safe_load((REPO / "configs/train/tiny.yaml").read_text())["stages"][0]["train"]
    assert train["method"] == "sft"
    return SFTConfig.model_validate({**train, "max_steps": 2})


@pytest.mark.slow  # four processes importing torch/trl plus two accelerate launchers: ~1-2 min on 2 cores
def test_two_nodes_train_one_model(tiny_llm, refs, tmp_path, monkeypatch, caplog):
    caplog.set_level("INFO", logger="nexus")
    shared = tmp_path / "shared"  # what every pod of the job mounts
    job = {"NEXUS_NNODES": "2", "NEXUS_MAIN_ADDR": "127.0.0.1", "NEXUS_MAIN_PORT": str(_free_port()),
           "NEXUS_MULTINODE_DIR": str(shared / "multinode/job-1"), "NEXUS_WORK": str(shared / "work"),
           "NEXUS_NODE_JOIN_TIMEOUT_S": "600"}
    # Node 1: a fresh "pod" with its own NEXUS_HOME, the job's env and the same store; no MLflow/catalog.
    node1_home = tmp_path / "node1-home"
    env1 = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "NEXUS_CATALOG_URL")}
    env1.update(job, NEXUS_NODE_RANK="1", NEXUS_HOME=str(node1_home))
    stand_in = [sys.executable, "-c", "raise SystemExit('node 1 ran the flow run')"]  # must never run
    agent_log = tmp_path / "node1.log"
    with open(agent_log, "w") as log_fh:
        agent = subprocess.Popen([sys.executable, "-m", "nexus_core.train.node_agent", "--", *stand_in],
                                 env=env1, stdout=log_fh, stderr=subprocess.STDOUT, text=True)
        # Node 0: this process, through the ordinary runner.
        for k, v in {**job, "NEXUS_NODE_RANK": "0"}.items():
            monkeypatch.setenv(k, v)
        try:
            r = run_step(run_sft, _tiny_sft(), name="t_2nodes", inputs={"model": raw_ref(tiny_llm), "data": refs["sft"]})
        finally:
            Rendezvous(job["NEXUS_MULTINODE_DIR"]).finish(0)  # what rank 0's entry point does after the flow run
            agent.wait(timeout=120)
    out1 = agent_log.read_text()
    assert agent.returncode == 0, out1
    assert "node 1 ran the flow run" not in out1

    # Both nodes took part in one world of 2 and ended with the same weights (gradients all-reduced).
    assert r.metrics["world_size"] == 2 and r.metrics["nodes"] == 2 and r.metrics["ranks_in_sync"] == 1
    assert r.steps == 2 and r.metrics["param_delta"] > 0
    sha0 = re.search(r"rank 0/2 on node 0 \(.*?\): trainable parameters sha256 (\w+)", caplog.text)
    sha1 = re.search(r"rank 1/2 on node 1 \(.*?\): trainable parameters sha256 (\w+)", out1)
    assert sha0 and sha1, (caplog.text[-2000:], out1[-2000:])
    assert sha0.group(1) == sha1.group(1)
    assert "training in pid" in out1 and "(rank 1)" in out1  # the trainer ran in node 1's process
    rdv = Rendezvous(job["NEXUS_MULTINODE_DIR"])
    assert rdv.launches() == [1] and rdv.acks(1, "exit") [1]["rc"] == 0 and rdv.ended(1)

    # One published model, by rank 0; node 1 published and logged nothing.
    assert list_versions("train", "t_2nodes") == [1]
    assert (r.ref.path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (node1_home / "mlflow.db").exists() and not (node1_home / "catalog.db").exists()
    assert not list((node1_home / "node-agent").iterdir())  # its scratch output dir was removed, empty
    assert "wrote into its output dir" not in out1
    assert not (shared / "work" / "train").exists() or not any((shared / "work" / "train").iterdir())


def _publish(rdv: Rendezvous, work_dir: Path, nnodes: int = 2) -> int:
    spec = {"step": "nexus_core.train.sft.run_sft", "work_dir": str(work_dir), "launch_id": "abc123"}
    seq, _ = rdv.publish_launch(spec, ["--num_processes", "2"], nnodes)
    return seq


def test_agent_refuses_a_launch_whose_work_dir_it_does_not_share(tmp_path, monkeypatch):
    monkeypatch.setattr(node_agent, "SHARED_WORK_GRACE_S", 0.2)
    rdv = Rendezvous(tmp_path / "rdv")
    seq = _publish(rdv, tmp_path / "rank0-local-work")  # rank 0 wrote its spec where node 1 cannot see it
    nodes = Nodes(nnodes=2, rank=1, dir=rdv.root)
    agent = node_agent._Agent(nodes, tmp_path / "scratch", poll_s=0.05)
    agent.join(seq)
    refused = rdv.acks(seq, "refused")
    assert list(refused) == [1] and "not shared with rank 0" in refused[1]["error"]
    assert "NEXUS_WORK" in refused[1]["error"]
    assert rdv.acks(seq, "joined") == {}  # it never started a part

    # The agent's loop skips launches that ended before it saw them, and exits once rank 0 is done.
    rdv.end_launch(seq, 0)
    rdv.finish(0)
    assert node_agent._Agent(nodes, tmp_path / "scratch2", poll_s=0.05).run() == 0


def test_rank0_stops_a_launch_a_node_refuses_or_never_joins(tmp_path):
    rdv = Rendezvous(tmp_path / "rdv")
    seq = _publish(rdv, tmp_path / "work")
    nodes = Nodes(nnodes=3, rank=0, dir=rdv.root, join_timeout_s=0.5)
    rdv.ack(seq, 1, "joined")  # node 1 joins; node 2 never shows up
    problems: list[str] = []
    stop = threading.Event()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        t0 = time.monotonic()
        watch_launch(rdv, seq, nodes, proc, stop, problems, poll_s=0.05)
        proc.wait(timeout=10)
    assert time.monotonic() - t0 < 10 and proc.returncode != 0  # terminated, not left to the store timeout
    assert problems and "node(s) 2 did not join" in problems[0] and "node_agent" in problems[0]

    seq2 = _publish(rdv, tmp_path / "work")
    rdv.ack(seq2, 2, "refused", error="the step's work dir is not shared")
    problems.clear()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as proc:
        watch_launch(rdv, seq2, Nodes(nnodes=3, rank=0, dir=rdv.root), proc, stop, problems, poll_s=0.05)
    assert problems == ["node 2 refused the launch: the step's work dir is not shared"]


def test_agent_stops_its_part_when_rank0s_part_has_ended(tmp_path, monkeypatch):
    monkeypatch.setattr(node_agent, "AFTER_RANK0_GRACE_S", 0.2)
    rdv = Rendezvous(tmp_path / "rdv")
    seq = _publish(rdv, tmp_path / "work")
    agent = node_agent._Agent(Nodes(nnodes=2, rank=1, dir=rdv.root), tmp_path / "scratch", poll_s=0.05)
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], text=True) as proc:
        rdv.end_launch(seq, 1)  # rank 0's part failed; this node's processes would wait for it
        t0 = time.monotonic()
        agent.watch_rank0(seq, proc, threading.Event())
        proc.wait(timeout=10)
    assert proc.returncode != 0 and time.monotonic() - t0 < 10


def test_multinode_environment():
    n = nodes_from_env({"NEXUS_NNODES": "4", "JOB_COMPLETION_INDEX": "3", "NEXUS_MAIN_ADDR": "job-0.nexus-nodes",
                        "NEXUS_MULTINODE_DIR": "/mnt/nexus/multinode/job"})
    assert (n.multi, n.rank, n.main_addr, n.main_port, str(n.dir)) == (
        True, 3, "job-0.nexus-nodes", 29500, "/mnt/nexus/multinode/job")
    assert not nodes_from_env({}).multi
    with pytest.raises(StepError) as err:
        nodes_from_env({"NEXUS_NNODES": "two", "NEXUS_MAIN_PORT": "0"})
    assert "NEXUS_NNODES='two'" in str(err.value) and "NEXUS_MAIN_PORT='0'" in str(err.value)
    with pytest.raises(StepError, match="NEXUS_NODE_RANK=2: a job of 2 node"):
        nodes_from_env({"NEXUS_NNODES": "2", "NEXUS_NODE_RANK": "2"})
    with pytest.raises(StepError, match="needs NEXUS_MULTINODE_DIR"):
        nodes_from_env({"NEXUS_NNODES": "2"}).rendezvous()


def test_a_training_step_on_a_node_other_than_rank0_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("NEXUS_NNODES", "2")
    monkeypatch.setenv("NEXUS_NODE_RANK", "1")
    with pytest.raises(StepError, match="only rank 0 runs the flow run"):
        run_stage(lambda *a: {}, SFTConfig(), {}, str(tmp_path / "out"), "sft", StepContext.detached())
    assert not (tmp_path / "out").exists()


def test_rank0_entry_point_tells_the_agents_when_the_flow_run_ends(tmp_path, monkeypatch):
    rdv = Rendezvous(tmp_path / "rdv")
    rdv.finish(0)  # stale, from an earlier attempt of this pod
    _publish(rdv, tmp_path / "work")  # left open by that attempt
    nodes = Nodes(nnodes=2, rank=0, dir=rdv.root)
    rc = node_agent.run_rank0([sys.executable, "-c", "import sys; sys.exit(3)"], nodes)
    assert rc == 3
    assert json.loads((rdv.root / "done.json").read_text())["rc"] == 3
    assert rdv.ended(1)  # the stale launch is closed, so a restarted agent does not join it
