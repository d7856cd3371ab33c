"""The GPU-cloud worker both Lambda and RunPod workers are: launch, watch, terminate, reap.

For each flow run the worker:

1. reads the provider API key from the worker's environment (``api_key_env`` names the variable;
   a missing key fails the submission with that name, nothing is launched);
2. checks every ``gpu_types`` entry is offered by the provider (an unknown type fails, nothing
   is launched);
3. launches one machine named ``nexus-<flow run id>`` (``nexus-<flow run id>-<n>`` for the run's
   n-th submission, e.g. after a suspended run is resumed), trying each GPU type in order and each
   region in order, moving on after a capacity error or a launch that does not come up within
   ``launch_timeout_s`` (that machine is terminated first);
4. reports the machine id as the flow run's infrastructure id, then watches both the Prefect
   flow run state (the run reports it itself from the machine) and the machine;
5. terminates the machine — always, in a ``finally`` — when the run is final or cancelling/cancelled;
   when it is suspended (``suspend_flow_run``: its process has exited, and a resume submits the run
   again, to a fresh machine); when it has been paused (``pause_flow_run``, the process waits on the
   machine) for ``paused_release_s`` — the pause is turned into a suspension first, so a resume still
   continues the run; when it has not reached Running ``pending_timeout_s`` after the machine came up
   (a failed image pull, a broken start command) or the machine passes ``max_runtime_s`` — the run is
   marked Crashed with a message naming the limit; when the machine dies; when the worker stops;
6. records the machine's time × price (infra/prices.yaml) in the cost ledger.

Machines run ``prefect flow-run execute`` with ``PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR=relinquish``
(unless the job's env sets it): when the worker terminates a machine it owns the run's next state,
so the dying engine must not report the run Crashed (Prefect's default on SIGTERM) over a suspension.

A worker that crashed cannot terminate its machines, so every worker also runs a reaper at start
and every ``reap_interval_s``: any ``nexus-*`` machine whose flow run is final, gone or suspended,
or that serves an older submission of a run that has a newer machine, is terminated.
"""

from __future__ import annotations

import abc
import time
from typing import Any, ClassVar
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.exceptions import ObjectNotFound
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field

from infra.providers.base import (
    CapacityError,
    GPUCloud,
    LaunchSpec,
    ProviderError,
    UnknownGPUTypeError,
    machine_name,
)

#: Defaults of the idle/limit knobs (job configuration and pool template variables alike).
PAUSED_RELEASE_S = 600.0      # a paused run keeps its GPU 10 min, then it is suspended and released
PENDING_TIMEOUT_S = 1200.0    # 20 min from machine up to Running covers pulling a large image
MAX_RUNTIME_S = 86400.0       # 24 h hard cap; training deployments that need more say so
#: Makes ``prefect flow-run execute`` leave the run's state to the worker when its machine is terminated.
SIGTERM_BEHAVIOR = ("PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR", "relinquish")


class GPUJobConfiguration(BaseJobConfiguration):
    """Job configuration shared by the GPU-cloud workers (filled from the work pool's template)."""

    image: str = Field(description="Container image with Nexus installed (infra/docker/Dockerfile.gpu)")
    gpu_types: list[str] = Field(min_length=1, description="GPU/instance types to try, in order")
    regions: list[str] = Field(default_factory=list, description="Regions / data centres to try, in order")
    gpu_count: int = Field(default=1, ge=1, description="GPUs per machine")
    disk_gb: int = Field(default=200, ge=10, description="Container/root disk in GB")
    launch_timeout_s: float = Field(default=900, gt=0, description="Give up on a machine not running after this")
    poll_interval_s: float = Field(default=15, gt=0, description="Seconds between state polls")
    max_runtime_s: float = Field(default=MAX_RUNTIME_S, gt=0,
                                 description="Terminate a machine running longer than this; the run is marked Crashed")
    pending_timeout_s: float = Field(default=PENDING_TIMEOUT_S, gt=0,
                                     description="Terminate a machine whose run is not Running this long after it is up")
    paused_release_s: float | None = Field(default=PAUSED_RELEASE_S, ge=0,
                                           description="Suspend a run paused this long and release its machine "
                                                       "(None: keep it)")
    api_url: str | None = Field(default=None, description="Provider API base URL (default: the public API)")
    api_key_env: str = Field(description="Name of the worker env variable holding the provider API key")


class GPUVariables(BaseVariables):
    """Variables of the GPU work pools' base job template (what deployments may override)."""

    image: str = Field(default="ghcr.io/nexus/nexus-gpu:latest", description="Container image to run the flow in")
    gpu_types: list[str] = Field(min_length=1, description="GPU/instance types to try, in order of preference")
    regions: list[str] = Field(default_factory=list, description="Regions / data centres to try, in order")
    gpu_count: int = Field(default=1, ge=1, description="GPUs per machine")
    disk_gb: int = Field(default=200, ge=10, description="Container/root disk in GB")
    launch_timeout_s: float = Field(default=900, gt=0, description="Seconds a machine may take to start running")
    poll_interval_s: float = Field(default=15, gt=0, description="Seconds between state polls")
    max_runtime_s: float = Field(default=MAX_RUNTIME_S, gt=0,
                                 description="Hard cap on a machine's lifetime in seconds (default 24 h); past it the "
                                             "machine is terminated and the run marked Crashed")
    pending_timeout_s: float = Field(default=PENDING_TIMEOUT_S, gt=0,
                                     description="Seconds a flow run may stay Pending once its machine is up (image "
                                                 "pull, start-up); past it the machine is terminated and the run "
                                                 "marked Crashed")
    paused_release_s: float | None = Field(default=PAUSED_RELEASE_S, ge=0,
                                           description="Seconds a paused run (pause_flow_run) keeps its machine; then "
                                                       "the pause becomes a suspension and the machine is released "
                                                       "(a resume relaunches). Suspended runs release at once. "
                                                       "null: keep the machine while paused")
    api_url: str | None = Field(default=None, description="Provider API base URL (tests point it at a local server)")
    api_key_env: str = Field(description="Name of the worker's environment variable holding the API key")


class GPUWorkerResult(BaseWorkerResult):
    """The machine id and how the run ended (0: completed or cancelled on purpose)."""


class GPUCloudWorker(BaseWorker, abc.ABC):
    """Base of the Lambda and RunPod workers: subclasses provide ``make_cloud`` and their types."""

    provider: ClassVar[str] = ""
    reap_interval_s: ClassVar[float] = 300.0

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._watching: set[str] = set()
        self._last_reap = 0.0

    # -- provider specifics ------------------------------------------------------------------
    def make_cloud(self, configuration: GPUJobConfiguration) -> GPUCloud:
        """A provider client for this configuration (raises MissingAPIKeyError)."""
        raise NotImplementedError

    def launch_spec(self, configuration: GPUJobConfiguration, flow_run_id: str, gpu: str,
                    region: str | None, attempt: int = 1) -> LaunchSpec:
        """What to launch for one try of the run's ``attempt``-th submission."""
        # NEXUS_PROVIDER / NEXUS_GPU_TYPE / NEXUS_GPU_COUNT: the runner prices each step's time on this
        # machine from infra/prices.yaml (nexus_core.costs.machine)
        env = {k: v for k, v in configuration.env.items() if v is not None}
        env.update(NEXUS_PROVIDER=self.provider, NEXUS_GPU_TYPE=gpu, NEXUS_GPU_COUNT=str(configuration.gpu_count))
        env.setdefault(*SIGTERM_BEHAVIOR)
        return LaunchSpec(name=machine_name(flow_run_id, attempt), gpu_type=gpu, region=region,
                          image=configuration.image, command=configuration.command or "prefect flow-run execute",
                          env=env, disk_gb=configuration.disk_gb, gpu_count=configuration.gpu_count)

    # -- run -----------------------------------------------------------------------------------
    async def run(self, flow_run: FlowRun, configuration: GPUJobConfiguration,
                  task_status: anyio.abc.TaskStatus | None = None) -> GPUWorkerResult:
        """Launch a machine for ``flow_run``, watch it to the end, and always terminate it."""
        log = self.get_flow_run_logger(flow_run)
        cloud = self.make_cloud(configuration)
        instance_id: str | None = None
        gpu = None
        started = time.monotonic()
        try:
            await self.check_gpu_types(cloud, configuration)
            attempt, since = await self._submission(flow_run)
            instance_id, gpu, region = await self.launch_with_fallback(cloud, configuration, str(flow_run.id),
                                                                       attempt)
            started = time.monotonic()
            log.info(f"{self.provider}: flow run is on {gpu} in {region or 'any region'} (machine {instance_id})")
            if task_status is not None:
                task_status.started(instance_id)
            code = await self.watch(cloud, instance_id, flow_run, configuration, attempt, since)
            return GPUWorkerResult(identifier=instance_id, status_code=code)
        finally:
            if instance_id is not None:
                # Shielded: a cancelled or stopping worker must still stop the bill.
                with anyio.CancelScope(shield=True):
                    await self._terminate(cloud, instance_id, log)
                    self._record_cost(flow_run, gpu, configuration, time.monotonic() - started, log)
            with anyio.CancelScope(shield=True):
                await cloud.aclose()

    async def _submission(self, flow_run: FlowRun) -> tuple[int, int]:
        """(n, i): this is the run's n-th submission (a worker proposes "Pending" each time) and its
        states from index i on are this submission's."""
        states = await self.client.read_flow_run_states(flow_run.id)
        n = sum(1 for s in states if s.type == StateType.PENDING and s.name == "Pending")
        return max(1, n), max(0, len(states) - 1)

    async def check_gpu_types(self, cloud: GPUCloud, configuration: GPUJobConfiguration) -> None:
        """Fail before launching anything if a configured GPU type is not offered."""
        offered = await cloud.offered_gpu_types()
        unknown = [g for g in configuration.gpu_types if g not in offered]
        if unknown:
            raise UnknownGPUTypeError(
                f"{self.provider}: GPU type(s) {', '.join(map(repr, unknown))} not offered; job variable "
                f"gpu_types must use the provider's names, e.g. {', '.join(sorted(offered)[:8])}; "
                "nothing was launched")

    async def launch_with_fallback(self, cloud: GPUCloud, configuration: GPUJobConfiguration,
                                   flow_run_id: str, attempt: int = 1) -> tuple[str, str, str | None]:
        """Try GPU types then regions in order until one machine runs; return (id, gpu, region)."""
        attempts: list[str] = []
        for gpu in configuration.gpu_types:
            for region in configuration.regions or [None]:
                spec = self.launch_spec(configuration, flow_run_id, gpu, region, attempt)
                try:
                    instance_id = await cloud.launch(spec)
                except CapacityError as exc:
                    attempts.append(f"{gpu}@{region or 'any'}: no capacity")
                    self._logger.info(f"{exc}; trying the next GPU type/region")
                    continue
                self._watching.add(instance_id)
                if await self._wait_running(cloud, instance_id, configuration):
                    return instance_id, gpu, region
                attempts.append(f"{gpu}@{region or 'any'}: not running after {configuration.launch_timeout_s:g}s")
                await self._terminate(cloud, instance_id, self._logger)
        raise CapacityError(f"{self.provider}: could not start a machine ({'; '.join(attempts)}); "
                            "nothing is left running")

    async def _wait_running(self, cloud: GPUCloud, instance_id: str, cfg: GPUJobConfiguration) -> bool:
        deadline = time.monotonic() + cfg.launch_timeout_s
        while time.monotonic() < deadline:
            inst = await cloud.get(instance_id)
            if inst is not None and inst.phase == "running":
                return True
            if inst is None or inst.phase == "ended":
                return False
            await anyio.sleep(min(cfg.poll_interval_s, max(deadline - time.monotonic(), 0)))
        return False

    async def watch(self, cloud: GPUCloud, instance_id: str, flow_run: FlowRun,
                    cfg: GPUJobConfiguration, attempt: int = 1, since: int = 0) -> int:
        """Poll the flow run and the machine until the machine is no longer needed; return the exit status.

        0: the run completed, was cancelled, or left this machine on purpose (suspended, resumed
        elsewhere, or paused past ``paused_release_s`` and suspended here). 1: the run failed or
        crashed, the machine died, or a limit (``pending_timeout_s``, ``max_runtime_s``) was passed.
        """
        log = self.get_flow_run_logger(flow_run)
        t0 = time.monotonic()
        reached_running = False
        last_state_id = None
        paused_state_id, paused_t0 = None, 0.0
        while True:
            run = await self.client.read_flow_run(flow_run.id)
            state = run.state
            stype = state.type if state else None
            now = time.monotonic()
            if stype in (StateType.CANCELLING, StateType.CANCELLED):
                await self._terminate(cloud, instance_id, log)
                if stype == StateType.CANCELLING:
                    await self._mark_flow_run_as_cancelled(
                        run, {"message": f"Cancelled; {self.provider} machine {instance_id} terminated."})
                return 0
            if state is not None and state.is_final():
                return 0 if stype == StateType.COMPLETED else 1
            if state is not None and state.id != last_state_id:
                # A suspend (or a resume and re-submission) can come and go between two polls.
                last_state_id = state.id
                left = await self._left_machine(flow_run, attempt, since)
                if left:
                    log.info(f"{self.provider}: flow run {left}; releasing machine {instance_id}")
                    return 0
            if stype is not None and stype != StateType.PENDING:
                reached_running = True
            if state is not None and stype == StateType.PAUSED and not state.state_details.pause_reschedule:
                if paused_state_id != state.id:
                    paused_state_id, paused_t0 = state.id, now
                if cfg.paused_release_s is not None and now - paused_t0 >= cfg.paused_release_s:
                    code = await self._suspend_paused(
                        run, state, f"paused longer than paused_release_s={cfg.paused_release_s:g}s: "
                                    f"{self.provider} machine {instance_id} released", log)
                    if code is not None:
                        return code
                    continue
            inst = await cloud.get(instance_id)
            if inst is None or inst.phase == "ended":
                # The run may report its final state a moment after its machine exits.
                await anyio.sleep(min(cfg.poll_interval_s, 2.0))
                run = await self.client.read_flow_run(flow_run.id)
                if run.state is not None and run.state.is_final():
                    return 0 if run.state.type == StateType.COMPLETED else 1
                if run.state is not None and run.state.type == StateType.PAUSED:
                    code = await self._suspend_paused(
                        run, run.state, f"{self.provider} machine {instance_id} ended while the run was paused", log)
                    if code is not None:
                        return code
                log.error(f"{self.provider} machine {instance_id} ended "
                          f"({inst.raw_status if inst else 'gone'}) before the flow run finished")
                return 1
            if not reached_running and now - t0 > cfg.pending_timeout_s:
                return await self._crash(run, f"flow run did not start running within pending_timeout_s="
                                              f"{cfg.pending_timeout_s:g}s of {self.provider} machine {instance_id} "
                                              "coming up (image pull or start command failed?); machine terminated",
                                         log)
            if now - t0 > cfg.max_runtime_s:
                return await self._crash(run, f"{self.provider} machine {instance_id} passed max_runtime_s="
                                              f"{cfg.max_runtime_s:g}s; machine terminated", log)
            await anyio.sleep(cfg.poll_interval_s)

    async def _left_machine(self, flow_run: FlowRun, attempt: int, since: int) -> str | None:
        """Why the run no longer needs the machine of its ``attempt``-th submission (whose states
        start at index ``since``), or None.

        Suspended since that submission: its process has exited (a resume submits it again).
        Submitted again since: it runs, or will run, on a newer machine.
        """
        states = await self.client.read_flow_run_states(flow_run.id)
        submissions = sum(1 for s in states if s.type == StateType.PENDING and s.name == "Pending")
        if submissions > attempt:
            return f"was submitted again (submission {submissions})"
        if any(s.type == StateType.PAUSED and s.state_details.pause_reschedule for s in states[since:]):
            return "was suspended (its process has exited; a resume launches a new machine)"
        return None

    async def _suspend_paused(self, run: FlowRun, paused: State, reason: str, log: Any) -> int | None:
        """Turn a blocking pause into a suspension so its machine can go and a resume relaunches the run.

        The flow re-runs from its cached tasks on resume and ``pause_flow_run`` with the same key returns
        at once (Prefect rejects a pause key that has fired). Returns None when the run left the pause
        meanwhile (keep watching), 0 once suspended, 1 when the run could not be suspended (Crashed).
        """
        current = await self.client.read_flow_run(run.id)
        if current.state is None or current.state.id != paused.id:
            return None
        if run.deployment_id is None:
            return await self._crash(run, f"{reason}; a flow run without a deployment cannot be suspended", log)
        details = paused.state_details.model_copy(update={"pause_reschedule": True})
        suspended = paused.model_copy(update={
            "name": "Suspended", "state_details": details,
            "message": f"{reason}; resume the run to continue it on a new machine"})
        await self.client.set_flow_run_state(run.id, suspended, force=True)
        log.warning(f"{self.provider}: {reason}; the run is suspended, a resume relaunches it")
        return 0

    async def _crash(self, run: FlowRun, message: str, log: Any) -> int:
        """Mark the run Crashed with ``message`` (shown in the UI) and return exit status 1."""
        log.error(message)
        await self._propose_crashed_state(run, message)
        return 1

    async def kill_infrastructure(self, infrastructure_pid: str, configuration: GPUJobConfiguration,
                                  grace_seconds: int = 30) -> None:
        """Terminate the machine of a cancelled run (Prefect's cancellation path)."""
        cloud = self.make_cloud(configuration)
        try:
            await self._terminate(cloud, infrastructure_pid, self._logger)
        finally:
            await cloud.aclose()

    async def _terminate(self, cloud: GPUCloud, instance_id: str, log: Any) -> None:
        for attempt in range(3):
            try:
                await cloud.terminate(instance_id)
                self._watching.discard(instance_id)
                return
            except ProviderError as exc:
                log.warning(f"terminate {instance_id} failed (attempt {attempt + 1}): {exc}")
                await anyio.sleep(1.0 * (attempt + 1))
        log.error(f"could not terminate {self.provider} machine {instance_id}; the reaper will retry")

    def _record_cost(self, flow_run: FlowRun, gpu: str | None, cfg: GPUJobConfiguration,
                     seconds: float, log: Any) -> None:
        """Machine time × price into the cost ledger; a missing price is a warning, not a crash.

        The steps that ran on the machine already charged their own GPU time (the runner prices each
        step from the machine env, in a ledger shared through NEXUS_CATALOG_URL): the machine's row
        holds only the rest (start-up, image pull, idle), so nothing is counted twice."""
        if not gpu:
            return
        try:
            from nexus_core import catalog, costs

            row = costs.price(self.provider, gpu)
            units = cfg.gpu_count if row.unit == "gpu" else 1
            total = costs.gpu_cost(self.provider, gpu, seconds, units)
            charged = min(costs.step_gpu_usd(str(flow_run.id), self.provider), total)
            rest = 1.0 - charged / total if total else 1.0
            catalog.add(catalog.CostRow(
                flow_name=None, flow_run_id=str(flow_run.id), step=f"infra.{self.provider}.machine",
                provider=self.provider, kind="gpu", model=gpu, gpu_seconds=seconds * cfg.gpu_count * rest,
                usd=total - charged))
        except Exception as exc:  # noqa: BLE001 - the ledger must never keep a machine alive
            log.warning(f"cost not recorded for {gpu}: {exc}")

    # -- reaper --------------------------------------------------------------------------------
    async def setup(self) -> None:
        """Start as usual, then reap machines a previous (crashed) worker left behind."""
        await super().setup()
        await self._maybe_reap(force=True)

    async def sync_with_backend(self) -> None:
        """Heartbeat as usual, and reap orphans every ``reap_interval_s``."""
        await super().sync_with_backend()
        await self._maybe_reap()

    async def _maybe_reap(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._last_reap < self.reap_interval_s:
            return
        if self._work_pool is None:
            return
        self._last_reap = time.monotonic()
        try:
            await self.reap_orphans()
        except Exception as exc:  # noqa: BLE001 - a failed sweep is retried at the next interval
            self._logger.warning(f"{self.provider}: orphan sweep failed: {exc}")

    async def reap_orphans(self) -> list[str]:
        """Terminate ``nexus-*`` machines nobody needs any more; return their ids.

        A machine is an orphan when its flow run is final, cancelling, gone or suspended, or when a
        newer submission of its run has a machine of its own (``nexus-<run id>-<n>``). Machines this
        worker is watching are left to their watch, and a run that is Scheduled, Pending, Running or
        Paused keeps its newest machine: a resumed run's new machine is never taken for an orphan.
        """
        cfg = await self.job_configuration.from_template_and_values(
            self.work_pool.base_job_template, {}, client=self.client)
        cloud = self.make_cloud(cfg)
        reaped = []
        try:
            live = [i for i in await cloud.list() if i.flow_run_id is not None and i.phase != "ended"]
            newest: dict[str, int] = {}
            for inst in live:
                newest[inst.flow_run_id or ""] = max(newest.get(inst.flow_run_id or "", 0), inst.attempt)
            for inst in live:
                run_id = inst.flow_run_id or ""
                if inst.id in self._watching:
                    continue
                why = None
                if inst.attempt < newest[run_id]:
                    why = f"its flow run has a newer machine (submission {newest[run_id]})"
                else:
                    try:
                        state = (await self.client.read_flow_run(UUID(run_id))).state
                    except (ObjectNotFound, ValueError):
                        state = None
                    if state is None or state.is_final() or state.type == StateType.CANCELLING:
                        why = "its flow run has ended"
                    elif state.type == StateType.PAUSED and state.state_details.pause_reschedule:
                        why = "its flow run is suspended"
                if why:
                    self._logger.warning(f"{self.provider}: terminating orphaned machine {inst.id} ({inst.name}): {why}")
                    await self._terminate(cloud, inst.id, self._logger)
                    reaped.append(inst.id)
        finally:
            await cloud.aclose()
        return reaped
