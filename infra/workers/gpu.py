"""The GPU-cloud worker both Lambda and RunPod workers are: launch, watch, terminate, reap.

For each flow run the worker:

1. reads the provider API key from the worker's environment (``api_key_env`` names the variable;
   a missing key fails the submission with that name, nothing is launched);
2. checks every ``gpu_types`` entry is offered by the provider (an unknown type fails, nothing
   is launched);
3. launches one machine named ``nexus-<flow run id>``, trying each GPU type in order and each
   region in order, moving on after a capacity error or a launch that does not come up within
   ``launch_timeout_s`` (that machine is terminated first);
4. reports the machine id as the flow run's infrastructure id, then watches both the Prefect
   flow run state (the run reports it itself from the machine) and the machine;
5. terminates the machine when the run is final, cancelling/cancelled, past ``max_runtime_s``,
   when the machine dies, or when the worker itself is stopped — always, in a ``finally``;
6. records the machine's time × price (infra/prices.yaml) in the cost ledger.

A worker that crashed cannot terminate its machines, so every worker also runs a reaper at start
and every ``reap_interval_s``: any ``nexus-*`` machine whose flow run is final or gone is terminated.
"""

from __future__ import annotations

import abc
import time
from typing import Any, ClassVar
from uuid import UUID

import anyio
import anyio.abc
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import ObjectNotFound
from prefect.workers.base import BaseJobConfiguration, BaseVariables, BaseWorker, BaseWorkerResult
from pydantic import Field

from infra.providers.base import (
    LABEL_PREFIX,
    CapacityError,
    GPUCloud,
    LaunchSpec,
    ProviderError,
    UnknownGPUTypeError,
)


class GPUJobConfiguration(BaseJobConfiguration):
    """Job configuration shared by the GPU-cloud workers (filled from the work pool's template)."""

    image: str = Field(description="Container image with Nexus installed (infra/docker/Dockerfile.gpu)")
    gpu_types: list[str] = Field(min_length=1, description="GPU/instance types to try, in order")
    regions: list[str] = Field(default_factory=list, description="Regions / data centres to try, in order")
    gpu_count: int = Field(default=1, ge=1, description="GPUs per machine")
    disk_gb: int = Field(default=200, ge=10, description="Container/root disk in GB")
    launch_timeout_s: float = Field(default=900, gt=0, description="Give up on a machine not running after this")
    poll_interval_s: float = Field(default=15, gt=0, description="Seconds between state polls")
    max_runtime_s: float | None = Field(default=None, gt=0, description="Terminate a machine running longer than this")
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
    max_runtime_s: float | None = Field(default=None, gt=0, description="Hard cap on a machine's lifetime, seconds")
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
                    region: str | None) -> LaunchSpec:
        """What to launch for one attempt."""
        # NEXUS_PROVIDER / NEXUS_GPU_TYPE / NEXUS_GPU_COUNT: the runner prices each step's time on this
        # machine from infra/prices.yaml (nexus_core.costs.machine)
        env = {k: v for k, v in configuration.env.items() if v is not None}
        env.update(NEXUS_PROVIDER=self.provider, NEXUS_GPU_TYPE=gpu, NEXUS_GPU_COUNT=str(configuration.gpu_count))
        return LaunchSpec(name=f"{LABEL_PREFIX}{flow_run_id}", gpu_type=gpu, region=region,
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
            instance_id, gpu, region = await self.launch_with_fallback(cloud, configuration, str(flow_run.id))
            started = time.monotonic()
            log.info(f"{self.provider}: flow run is on {gpu} in {region or 'any region'} (machine {instance_id})")
            if task_status is not None:
                task_status.started(instance_id)
            code = await self.watch(cloud, instance_id, flow_run, configuration)
            return GPUWorkerResult(identifier=instance_id, status_code=code)
        finally:
            if instance_id is not None:
                # Shielded: a cancelled or stopping worker must still stop the bill.
                with anyio.CancelScope(shield=True):
                    await self._terminate(cloud, instance_id, log)
                    self._record_cost(flow_run, gpu, configuration, time.monotonic() - started, log)
            with anyio.CancelScope(shield=True):
                await cloud.aclose()

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
                                   flow_run_id: str) -> tuple[str, str, str | None]:
        """Try GPU types then regions in order until one machine runs; return (id, gpu, region)."""
        attempts: list[str] = []
        for gpu in configuration.gpu_types:
            for region in configuration.regions or [None]:
                spec = self.launch_spec(configuration, flow_run_id, gpu, region)
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
                    cfg: GPUJobConfiguration) -> int:
        """Poll the flow run and the machine until the run ends; return the exit status."""
        log = self.get_flow_run_logger(flow_run)
        t0 = time.monotonic()
        while True:
            run = await self.client.read_flow_run(flow_run.id)
            state = run.state.type if run.state else None
            if state in (StateType.CANCELLING, StateType.CANCELLED):
                await self._terminate(cloud, instance_id, log)
                if state == StateType.CANCELLING:
                    await self._mark_flow_run_as_cancelled(
                        run, {"message": f"Cancelled; {self.provider} machine {instance_id} terminated."})
                return 0
            if run.state is not None and run.state.is_final():
                return 0 if state == StateType.COMPLETED else 1
            inst = await cloud.get(instance_id)
            if inst is None or inst.phase == "ended":
                # The run may report its final state a moment after its machine exits.
                await anyio.sleep(min(cfg.poll_interval_s, 2.0))
                run = await self.client.read_flow_run(flow_run.id)
                if run.state is not None and run.state.is_final():
                    return 0 if run.state.type == StateType.COMPLETED else 1
                log.error(f"{self.provider} machine {instance_id} ended "
                          f"({inst.raw_status if inst else 'gone'}) before the flow run finished")
                return 1
            if cfg.max_runtime_s and time.monotonic() - t0 > cfg.max_runtime_s:
                log.error(f"{self.provider} machine {instance_id} passed max_runtime_s={cfg.max_runtime_s:g}")
                return 1
            await anyio.sleep(cfg.poll_interval_s)

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
        """Machine time × price into the cost ledger; a missing price is a warning, not a crash."""
        if not gpu:
            return
        try:
            from nexus_core import catalog, costs

            row = costs.price(self.provider, gpu)
            units = cfg.gpu_count if row.unit == "gpu" else 1
            catalog.add(catalog.CostRow(
                flow_name=None, flow_run_id=str(flow_run.id), step=f"infra.{self.provider}.machine",
                provider=self.provider, kind="gpu", model=gpu, gpu_seconds=seconds * cfg.gpu_count,
                usd=costs.gpu_cost(self.provider, gpu, seconds, units)))
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
        """Terminate ``nexus-*`` machines whose flow run is final or gone; return their ids."""
        cfg = await self.job_configuration.from_template_and_values(
            self.work_pool.base_job_template, {}, client=self.client)
        cloud = self.make_cloud(cfg)
        reaped = []
        try:
            for inst in await cloud.list():
                run_id = inst.flow_run_id
                if run_id is None or inst.phase == "ended" or inst.id in self._watching:
                    continue
                try:
                    run = await self.client.read_flow_run(UUID(run_id))
                    ended = run.state is None or run.state.is_final() or run.state.type == StateType.CANCELLING
                except (ObjectNotFound, ValueError):
                    ended = True
                if ended:
                    self._logger.warning(f"{self.provider}: terminating orphaned machine {inst.id} "
                                         f"({inst.name}): its flow run has ended")
                    await self._terminate(cloud, inst.id, self._logger)
                    reaped.append(inst.id)
        finally:
            await cloud.aclose()
        return reaped
