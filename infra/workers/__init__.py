"""Nexus Prefect workers. This module is the ``prefect.collections`` entry point: importing it
registers the ``nexus-lambda`` and ``nexus-runpod`` worker types with Prefect."""

from infra.workers.lambda_worker import LambdaWorker
from infra.workers.runpod_worker import RunPodWorker

__all__ = ["LambdaWorker", "RunPodWorker"]
