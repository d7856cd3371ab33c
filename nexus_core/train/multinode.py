"""Multi-node training: one ``accelerate launch`` spread over the nodes (pods) of a Kubernetes Indexed Job.

Rank 0 runs the Prefect flow run; every other node runs the node agent
(:mod:`nexus_core.train.node_agent`), which never calls Prefect and never publishes anything. When a
training step on rank 0 launches (:func:`nexus_core.train.launch.run_stage`), it publishes the launch
to a directory every node of the job shares; each agent runs the same launch with its own machine
rank, and rank 0 saves and publishes the model.

Environment (set by ``infra/coreweave/base_job_template.json``):

- ``NEXUS_NNODES``: nodes of the job (the Job's ``completions`` = ``parallelism``); 1 or unset: one node.
- ``NEXUS_NODE_RANK``: this node's rank, the pod's completion index (``JOB_COMPLETION_INDEX`` if unset).
- ``NEXUS_MAIN_ADDR``: rank 0's address, ``<job name>-0.<headless service>``.
- ``NEXUS_MAIN_PORT``: the rendezvous port on rank 0 (default 29500).
- ``NEXUS_MULTINODE_DIR``: the job's handshake directory, on the volume every node mounts.
- ``NEXUS_NODE_JOIN_TIMEOUT_S``: how long rank 0 waits for every node to join a launch (default 1800).

Handshake files in ``NEXUS_MULTINODE_DIR`` (each written atomically: temporary name, then rename):

==================================  ==========================================================================
``launch-0001.json``                rank 0: one launch (id, the launch spec, accelerate flags but the rank)
``launch-0001.rank1.joined.json``   node 1's agent started its part
``launch-0001.rank1.refused.json``  node 1's agent cannot take part, and why: rank 0 stops the launch
``launch-0001.rank1.exit.json``     node 1's part ended (exit code): rank 0 stops the launch on a failure
``launch-0001.end.json``            rank 0's part ended (exit code): a late agent does not join it
``done.json``                       rank 0's flow run ended (exit code): the agents exit
==================================  ==========================================================================
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nexus_core.artifacts import atomic_write_json
from nexus_core.errors import StepError

DEFAULT_PORT = 29500
DEFAULT_JOIN_TIMEOUT_S = 1800.0
_LAUNCH = re.compile(r"^launch-(\d+)\.json$")
_ACK = re.compile(r"^launch-(\d+)\.rank(\d+)\.(joined|refused|exit)\.json$")


@dataclass(frozen=True)
class Nodes:
    """Where this process sits in a multi-node job (see the module docstring for the variables)."""

    nnodes: int = 1
    rank: int = 0
    main_addr: str = "127.0.0.1"
    main_port: int = DEFAULT_PORT
    dir: Path | None = None
    join_timeout_s: float = DEFAULT_JOIN_TIMEOUT_S

    @property
    def multi(self) -> bool:
        """True in a job of more than one node."""
        return self.nnodes > 1

    def rendezvous(self) -> Rendezvous:
        """The job's handshake directory (a StepError names the variable when it is unset)."""
        if self.dir is None:
            raise StepError(f"multi-node training (NEXUS_NNODES={self.nnodes}) needs NEXUS_MULTINODE_DIR: a "
                            "directory on the volume every node of the job mounts")
        return Rendezvous(self.dir)


def nodes_from_env(env: dict[str, str] | os._Environ[str] | None = None) -> Nodes:
    """This process's :class:`Nodes` from the environment; one clear StepError for bad values."""
    env = os.environ if env is None else env
    problems: list[str] = []

    def number(name: str, default: float, kind: type = int, minimum: float = 0) -> Any:
        raw = (env.get(name) or "").strip()
        if not raw:
            return kind(default)
        try:
            value = kind(raw)
        except ValueError:
            value = None
        if value is None or value < minimum:
            problems.append(f"{name}={raw!r}: expected a {kind.__name__} >= {minimum:g}")
            return kind(default)
        return value

    nnodes = number("NEXUS_NNODES", 1, minimum=1)
    rank_var = "NEXUS_NODE_RANK" if (env.get("NEXUS_NODE_RANK") or "").strip() else "JOB_COMPLETION_INDEX"
    rank = number(rank_var, 0)
    if rank >= nnodes and not problems:
        problems.append(f"{rank_var}={rank}: a job of {nnodes} node(s) has ranks 0..{nnodes - 1}")
    nodes = Nodes(nnodes=nnodes, rank=rank, main_addr=(env.get("NEXUS_MAIN_ADDR") or "").strip() or "127.0.0.1",
                  main_port=number("NEXUS_MAIN_PORT", DEFAULT_PORT, minimum=1),
                  dir=Path(env["NEXUS_MULTINODE_DIR"]) if (env.get("NEXUS_MULTINODE_DIR") or "").strip() else None,
                  join_timeout_s=number("NEXUS_NODE_JOIN_TIMEOUT_S", DEFAULT_JOIN_TIMEOUT_S, float, 1))
    if problems:
        raise StepError("multi-node environment: " + "; ".join(problems))
    return nodes


def accelerate_flags(procs_per_node: int, nodes: Nodes) -> list[str]:
    """``accelerate launch`` flags of one launch over ``nodes``, all but ``--machine_rank`` (each node
    adds its own). ``--num_processes`` is the total over all machines; accelerate runs
    ``num_processes // num_machines`` per node. The static rendezvous waits as long as rank 0 waits
    for the agents, so a node that is slow to start fails with rank 0's message, not a store timeout."""
    return ["--num_processes", str(procs_per_node * nodes.nnodes), "--num_machines", str(nodes.nnodes),
            "--main_process_ip", nodes.main_addr, "--main_process_port", str(nodes.main_port),
            "--rdzv_backend", "static", "--rdzv_conf", f"timeout={int(nodes.join_timeout_s) + 60}"]


class Rendezvous:
    """The handshake directory of one multi-node job (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # -- rank 0
    def publish_launch(self, spec: dict[str, Any], flags: list[str], nnodes: int) -> tuple[int, str]:
        """Publish one launch; returns its sequence number and id (the id also goes into the spec
        rank 0 writes to the step's work dir, which is how an agent proves it sees the same work dir)."""
        self.root.mkdir(parents=True, exist_ok=True)
        seq = max(self.launches(), default=0) + 1
        launch_id = spec.get("launch_id") or uuid.uuid4().hex
        atomic_write_json(self._launch(seq), {"seq": seq, "id": launch_id, "nnodes": nnodes, "flags": flags,
                                              "spec": spec, "published": time.time()})
        return seq, launch_id

    def end_launch(self, seq: int, rc: int | Any) -> None:
        """Rank 0's part of launch ``seq`` ended with exit code ``rc`` (or a finished ``Popen``'s)."""
        if not isinstance(rc, int):
            rc = rc.returncode if rc.returncode is not None else -1
        atomic_write_json(self.root / f"launch-{seq:04d}.end.json", {"rc": rc, "ended": time.time()})

    def abandon_unfinished(self) -> list[int]:
        """Mark every launch without an end as ended (a restarted rank 0: nobody serves them any more)."""
        stale = [seq for seq in self.launches() if not self.ended(seq)]
        for seq in stale:
            self.end_launch(seq, -1)
        return stale

    def finish(self, rc: int) -> None:
        """Rank 0's flow run ended: every agent exits."""
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.root / "done.json", {"rc": rc, "ended": time.time()})

    def reset(self) -> None:
        """A (re)started rank 0: no stale ``done`` and no launch left open."""
        (self.root / "done.json").unlink(missing_ok=True)
        if self.root.is_dir():
            self.abandon_unfinished()

    # -- agents
    def ack(self, seq: int, rank: int, state: str, **info: Any) -> None:
        """Node ``rank``'s state in launch ``seq``: ``joined``, ``refused`` (with ``error``) or ``exit`` (``rc``)."""
        atomic_write_json(self.root / f"launch-{seq:04d}.rank{rank}.{state}.json", {**info, "at": time.time()})

    # -- both
    def launches(self) -> list[int]:
        """Sequence numbers of the published launches, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _LAUNCH.match(p.name)))

    def read_launch(self, seq: int) -> dict[str, Any]:
        """One published launch."""
        return json.loads(self._launch(seq).read_text())

    def ended(self, seq: int) -> bool:
        """Whether rank 0's part of launch ``seq`` ended."""
        return (self.root / f"launch-{seq:04d}.end.json").is_file()

    def acks(self, seq: int, state: str) -> dict[int, dict[str, Any]]:
        """Rank → what it wrote, for every node in ``state`` for launch ``seq``."""
        if not self.root.is_dir():
            return {}
        found = {}
        for p in self.root.iterdir():
            m = _ACK.match(p.name)
            if m and int(m.group(1)) == seq and m.group(3) == state:
                found[int(m.group(2))] = json.loads(p.read_text())
        return found

    def done(self) -> dict[str, Any] | None:
        """Rank 0's ``done`` record, once its flow run ended."""
        path = self.root / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def _launch(self, seq: int) -> Path:
        return self.root / f"launch-{seq:04d}.json"


def launch_problem(rdv: Rendezvous, seq: int, nnodes: int, deadline: float) -> str | None:
    """Why rank 0 should stop launch ``seq`` now, if it should: a node refused it or its part failed,
    or not every node joined before ``deadline`` (``time.monotonic()``)."""
    refused = rdv.acks(seq, "refused")
    if refused:
        return "; ".join(f"node {r} refused the launch: {a.get('error')}" for r, a in sorted(refused.items()))
    failed = {r: a for r, a in rdv.acks(seq, "exit").items() if a.get("rc") != 0}
    if failed:
        return "; ".join(f"node {r}'s part failed (exit {a.get('rc')})" for r, a in sorted(failed.items()))
    missing = sorted(set(range(1, nnodes)) - set(rdv.acks(seq, "joined")))
    if missing and time.monotonic() > deadline:
        return (f"node(s) {', '.join(map(str, missing))} did not join within the join timeout "
                "(NEXUS_NODE_JOIN_TIMEOUT_S): is `python -m nexus_core.train.node_agent` running there, with "
                f"the same NEXUS_MULTINODE_DIR ({rdv.root})?")
    return None


def watch_launch(rdv: Rendezvous, seq: int, nodes: Nodes, proc: Any, stop: Any, problems: list[str],
                 poll_s: float = 1.0) -> None:
    """Rank 0's watch over launch ``seq`` (run in a thread while ``proc``, its ``accelerate launch``,
    runs): terminate ``proc`` and record why in ``problems`` as soon as :func:`launch_problem` finds
    one; return once ``stop`` (a ``threading.Event``) is set."""
    deadline = time.monotonic() + nodes.join_timeout_s
    while not stop.wait(poll_s):
        problem = launch_problem(rdv, seq, nodes.nnodes, deadline)
        if problem:
            problems.append(problem)
            proc.terminate()  # torchrun's agent stops its workers on SIGTERM
            return


def rank_report(model: Any, sharded: bool) -> dict[str, Any]:
    """What this training process says about itself after training: global rank, world size, node,
    host and (unless the weights are sharded, FSDP) a sha256 of its trainable parameters."""
    import hashlib
    import socket

    digest = None
    if not sharded:
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters(), key=lambda np: np[0]):
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        digest = h.hexdigest()
    return {"rank": int(os.environ.get("RANK", "0")), "world_size": int(os.environ.get("WORLD_SIZE", "1")),
            "node": int(os.environ.get("GROUP_RANK") or os.environ.get("NEXUS_NODE_RANK") or 0),
            "host": socket.gethostname(), "params_sha256": digest}


def check_ranks(model: Any, sharded: bool, info: Any) -> dict[str, float]:
    """After a distributed run: every rank's :func:`rank_report`, gathered on every rank. Each rank logs
    its own; rank 0 logs the summary. Returns ``nodes`` (distinct nodes that took part) and, for DDP,
    ``ranks_in_sync`` (1.0 when every rank ended with the same trainable parameters: gradients were
    all-reduced; 0.0 otherwise)."""
    import torch.distributed as dist

    mine = rank_report(model, sharded)
    reports: list[Any] = [mine]
    if dist.is_available() and dist.is_initialized():
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, mine)
    sha = mine["params_sha256"]
    info(f"rank {mine['rank']}/{mine['world_size']} on node {mine['node']} ({mine['host']}): "
         f"trainable parameters sha256 {sha or 'n/a (sharded)'}")
    metrics = {"nodes": float(len({r["node"] for r in reports}))}
    if not sharded:
        digests = {r["params_sha256"] for r in reports}
        metrics["ranks_in_sync"] = float(len(digests) == 1)
        if mine["rank"] == 0:
            info(f"{len(reports)} ranks on {int(metrics['nodes'])} node(s): trainable parameters "
                 + ("identical on every rank" if len(digests) == 1 else
                    f"DIFFER across ranks ({len(digests)} distinct): gradients were not synchronised"))
    return metrics
