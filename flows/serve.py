"""The serve flow: an OpenAI-compatible server for released models, run until the flow run is cancelled.

    (models:/NAME@ALIAS | artifact | dir) ─► resolve ─► engine (embedded, or vLLM children) ─► HTTP

It is what ``nexus serve`` does, as a deployment: ``serve/release-vllm`` serves the current release
(``models:/nexus-tiny-release@champion``) with vLLM on a GPU pool. Cancelling the run (SIGTERM) stops
the server and its engine processes.
"""

from __future__ import annotations

from prefect import flow
from pydantic import Field

from flows.common import main
from nexus_core.config import FlowConfig
from nexus_core.serve.launch import ServeConfig, serve_models
from nexus_core.settings import configure_environment


class ServeFlowConfig(FlowConfig):
    """Config of the serve flow: a name for the run and the server's settings."""

    name: str = Field(default="serve", description="Name of this serving setup (shown in the run's logs)")
    server: ServeConfig = Field(description="What to serve, the engine and the limits")


@flow(name="serve", log_prints=True)
def serve(cfg: ServeFlowConfig) -> None:
    """Serve ``cfg.server`` until the run is cancelled."""
    configure_environment()  # MLflow store for registry entries, like every Nexus entry point
    if cfg.dry_run:
        print(f"{cfg.name}: would serve {sorted(cfg.server.models)} with the {cfg.server.engine} engine on "
              f"{cfg.server.host}:{cfg.server.port}")
        return
    serve_models(cfg.server)


if __name__ == "__main__":
    raise SystemExit(main(serve, ServeFlowConfig))
