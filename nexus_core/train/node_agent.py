"""The entry point of every pod of a Nexus Kubernetes job; on ranks > 0, the node agent.

    python -m nexus_core.train.node_agent -- prefect flow-run execute

- One-node job (``NEXUS_NNODES`` unset or 1): runs the command after ``--`` in its place (exec).
- Rank 0 of a multi-node job: runs the command (the Prefect flow run) as a child, passing on
  SIGTERM/SIGINT, and when it exits writes ``done.json`` to the job's handshake directory and exits
  with its code.
- Rank > 0: never runs the command, so never talks to Prefect. It waits for the training launches
  rank 0's steps publish (:mod:`nexus_core.train.multinode`), runs each as
  ``accelerate launch <rank 0's flags> --machine_rank <rank> -m nexus_core.train.launch <spec>``
  (stopping its part if it outlives rank 0's part of the launch by a minute), and exits 0 once rank
  0's flow run has ended.

An agent joins a launch only when it finds rank 0's launch spec, with the same launch id, in the
step's work dir: proof that this node shares the work dir (``NEXUS_WORK`` on the shared volume), so
every rank reads and writes the same checkpoints and all resume from the same step. Otherwise it
refuses, with the reason, and rank 0 stops the launch and fails the step with it. The agent's
processes get no MLflow run and a throw-away output dir: only rank 0 logs lineage, saves and
publishes the model (and the agent checks that nothing was written there).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from nexus_core.artifacts import atomic_write_json
from nexus_core.errors import StepError
from nexus_core.train.multinode import Nodes, nodes_from_env

POLL_S = 1.0
# How long a node waits to see rank 0's spec in the work dir (a network file system may show a new
# file on another node a little later) before refusing the launch as "work dir not shared".
SHARED_WORK_GRACE_S = 30.0
# How long a node's part may outlive rank 0's part of the same launch before the agent stops it
# (rank 0 failed, or its processes died without the collective erroring out on this node).
AFTER_RANK0_GRACE_S = 60.0


def say(message: str) -> None:
    """One line of the pod's log."""
    print(f"[nexus node-agent] {message}", flush=True)


class _Agent:
    """A rank > 0 node: join every launch rank 0 publishes until its flow run ends."""

    def __init__(self, nodes: Nodes, scratch: Path, poll_s: float = POLL_S):
        self.nodes, self.scratch, self.poll_s = nodes, scratch, poll_s
        self.rdv = nodes.rendezvous()
        self.proc: subprocess.Popen[str] | None = None
        self.stopping = False

    def stop(self, signum: int, frame: Any) -> None:
        """SIGTERM/SIGINT (the pod is being deleted): end the running part, then exit."""
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def run(self) -> int:
        n = self.nodes
        self.rdv.root.mkdir(parents=True, exist_ok=True)
        say(f"node {n.rank} of {n.nnodes}: not running the flow run (only rank 0 does); joining rank 0's "
            f"training launches from {self.rdv.root}")
        handled: set[int] = set()
        while not self.stopping:
            done = self.rdv.done()
            if done is not None:
                say(f"rank 0's flow run ended (exit {done.get('rc')}): node {n.rank} done")
                return 0
            for seq in self.rdv.launches():
                if seq in handled:
                    continue
                handled.add(seq)
                if self.rdv.ended(seq):  # over before this node saw it (a late or restarted pod)
                    continue
                self.join(seq)
                if self.stopping:
                    break
            time.sleep(self.poll_s)
        return 143

    def refusal(self, seq: int, launch: dict[str, Any]) -> str | None:
        """Why this node cannot take part in ``launch``, if it cannot."""
        if launch["nnodes"] != self.nodes.nnodes:
            return f"rank 0 launched for {launch['nnodes']} nodes; this node's job has {self.nodes.nnodes}"
        marker = Path(launch["spec"]["work_dir"]) / "launch.json"
        deadline = time.monotonic() + SHARED_WORK_GRACE_S
        while True:
            try:
                if json.loads(marker.read_text()).get("launch_id") == launch["id"]:
                    return None
            except (OSError, ValueError):
                pass
            if time.monotonic() > deadline or self.rdv.ended(seq):
                return (f"the step's work dir {marker.parent} is not shared with rank 0 (no launch spec "
                        f"{launch['id']} there): set NEXUS_WORK to a directory on the volume every node mounts")
            time.sleep(min(self.poll_s, 1.0))

    def watch_rank0(self, seq: int, proc: subprocess.Popen[str], stop: threading.Event) -> None:
        """Stop this node's part if it is still running ``AFTER_RANK0_GRACE_S`` after rank 0's part of
        the same launch ended: there is nobody left to train with."""
        while not stop.wait(self.poll_s):
            if self.rdv.ended(seq):
                if not stop.wait(AFTER_RANK0_GRACE_S) and proc.poll() is None:
                    say(f"launch {seq}: rank 0's part ended {AFTER_RANK0_GRACE_S:g}s ago; stopping this node's part")
                    proc.terminate()
                return

    def join(self, seq: int) -> None:
        """Run this node's part of launch ``seq`` and record how it ended."""
        launch, rank = self.rdv.read_launch(seq), self.nodes.rank
        problem = self.refusal(seq, launch)
        if problem:
            say(f"launch {seq}: refused: {problem}")
            self.rdv.ack(seq, rank, "refused", error=problem)
            return
        work = self.scratch / f"launch-{seq:04d}-{launch['id'][:8]}"
        shutil.rmtree(work, ignore_errors=True)
        out = work / "out"
        out.mkdir(parents=True)
        # No MLflow run, and never rank 0's output dir: lineage and the model are rank 0's alone.
        spec = {**launch["spec"], "run_id": None, "out_uri": str(out), "result": str(work / "result.json")}
        spec_path = atomic_write_json(work / "launch.json", spec)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch["flags"], "--machine_rank", str(rank),
               "-m", "nexus_core.train.launch", str(spec_path)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.rdv.ack(seq, rank, "joined", pid=os.getpid(), host=socket.gethostname())
        say(f"launch {seq} ({launch['spec']['step']}): joining as machine rank {rank}")
        t0 = time.monotonic()
        stop = threading.Event()
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) as proc:
            self.proc = proc
            threading.Thread(target=self.watch_rank0, args=(seq, proc, stop), daemon=True).start()
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
            sys.stdout.flush()
        stop.set()
        self.proc = None
        rc = proc.returncode
        self.rdv.ack(seq, rank, "exit", rc=rc, seconds=time.monotonic() - t0)
        say(f"launch {seq}: part of node {rank} ended (exit {rc}) after {time.monotonic() - t0:.1f}s")
        if any(out.iterdir()):
            say(f"launch {seq}: WARNING a rank > 0 wrote into its output dir; discarded (only rank 0 publishes)")
        shutil.rmtree(work, ignore_errors=True)


def run_rank0(command: list[str], nodes: Nodes) -> int:
    """Rank 0: run ``command`` (the flow run); in a multi-node job tell the agents when it ends."""
    if not nodes.multi:
        os.execvp(command[0], command)
    rdv = nodes.rendezvous()
    rdv.root.mkdir(parents=True, exist_ok=True)
    rdv.reset()  # a restarted rank 0: no stale done, no launch left open
    say(f"rank 0 of {nodes.nnodes}: running {' '.join(command)}; handshake directory {rdv.root}")
    proc = subprocess.Popen(command)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
    rc = proc.wait()
    rdv.finish(rc)
    say(f"flow run ended (exit {rc}); the other nodes exit")
    return rc


def run_agent(nodes: Nodes, scratch: Path | None = None, poll_s: float = POLL_S) -> int:
    """Rank > 0: the node agent (see the module docstring). Returns the exit code."""
    from nexus_core.settings import configure_environment, nexus_home

    configure_environment()
    agent = _Agent(nodes, scratch or nexus_home() / "node-agent", poll_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, agent.stop)
    return agent.run()


def main(argv: list[str] | None = None) -> int:
    """``python -m nexus_core.train.node_agent [-- COMMAND...]``."""
    args = sys.argv[1:] if argv is None else argv
    command = args[args.index("--") + 1:] if "--" in args else args
    try:
        nodes = nodes_from_env()
        if nodes.rank > 0:
            return run_agent(nodes)
        if not command:
            say("rank 0 needs the command to run after `--` (the worker's `prefect flow-run execute`)")
            return 2
        return run_rank0(command, nodes)
    except StepError as exc:
        say(f"error: {exc}")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
