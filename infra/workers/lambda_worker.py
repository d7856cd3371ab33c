"""Prefect worker type ``nexus-lambda``: runs each flow run on its own Lambda Cloud instance.

    export LAMBDA_API_KEY=...            # in the worker's environment only
    prefect work-pool create gpu-lambda --type nexus-lambda
    prefect worker start --pool gpu-lambda --type nexus-lambda
"""

from __future__ import annotations

from pydantic import Field

from infra.providers.base import api_key_from_env
from infra.providers.lambda_cloud import DEFAULT_URL, LambdaCloud
from infra.workers.gpu import GPUCloudWorker, GPUJobConfiguration, GPUVariables, GPUWorkerResult


class LambdaJobConfiguration(GPUJobConfiguration):
    """Lambda job configuration: instance types, regions, SSH key and file systems."""

    ssh_key_name: str | None = Field(default=None, description="SSH key (already in the Lambda account) for debugging")
    file_system_names: list[str] = Field(default_factory=list, description="Lambda file systems to attach")


class LambdaVariables(GPUVariables):
    """Base job template variables of a ``nexus-lambda`` work pool."""

    gpu_types: list[str] = Field(default=["gpu_1x_h100_pcie", "gpu_1x_a100_sxm4"], min_length=1,
                                 description="Lambda instance types to try, in order (e.g. gpu_1x_h100_pcie)")
    regions: list[str] = Field(default=["us-east-1", "us-west-1", "us-south-1"],
                               description="Lambda regions to try, in order")
    api_key_env: str = Field(default="LAMBDA_API_KEY", description="Worker env variable holding the Lambda API key")
    ssh_key_name: str | None = Field(default=None, description="SSH key (already in the Lambda account) for debugging")
    file_system_names: list[str] = Field(default_factory=list,
                                         description="Lambda file systems to attach (shared data, caches)")


class LambdaWorker(GPUCloudWorker):
    """Launches a Lambda Cloud instance per flow run and terminates it when the run ends."""

    type = "nexus-lambda"
    provider = "lambda"
    job_configuration = LambdaJobConfiguration
    job_configuration_variables = LambdaVariables
    _description = "Run each flow run on a Lambda Cloud GPU instance (Nexus)."
    _documentation_url = "https://docs-api.lambda.ai/api/cloud"

    def make_cloud(self, configuration: LambdaJobConfiguration) -> LambdaCloud:
        """A Lambda client with the key from the worker's environment."""
        key = api_key_from_env(configuration.api_key_env, "lambda")
        return LambdaCloud(key, configuration.api_url or DEFAULT_URL, ssh_key_name=configuration.ssh_key_name,
                           file_system_names=configuration.file_system_names)


__all__ = ["LambdaWorker", "LambdaJobConfiguration", "LambdaVariables", "GPUWorkerResult"]
