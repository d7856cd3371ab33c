"""Where Nexus keeps state, and the environment every entry point sets before heavy imports.

Everything lives under ``NEXUS_HOME`` (default ``./.nexus``): Prefect's home and database, the
MLflow store, the catalog, the steps' work dirs (``NEXUS_WORK`` moves those). Data artifacts live
under ``NEXUS_DATA`` (default ``./data``).

Importing this module (or ``flows``, ``tasks``) changes nothing: the environment is set by
:func:`configure_environment`, which entry points call (``nexus``, ``python -m flows.X``, and every flow
function through ``flows.common.flow_lineage``, which covers deployment runs).
"""

from __future__ import annotations

import os
from pathlib import Path


def nexus_home() -> Path:
    """The project-local state directory (``NEXUS_HOME``, default ``./.nexus``). Not created here:
    :func:`configure_environment` creates it, and so do the store URLs below, before anything opens them."""
    return Path(os.environ.get("NEXUS_HOME", ".nexus")).expanduser().resolve()


def _state_file(name: str) -> Path:
    """A SQLite file under ``NEXUS_HOME``, whose directory must exist before SQLite can create the file."""
    home = nexus_home()
    home.mkdir(parents=True, exist_ok=True)
    return home / name


def work_root() -> Path:
    """Root of the steps' work dirs (checkpoints, launch specs): ``NEXUS_WORK``, default
    ``NEXUS_HOME/work``. Multi-node jobs point it at the shared volume, so every node of a training
    launch reads and writes the same checkpoints, and a re-run on a fresh machine finds them."""
    return Path(os.environ.get("NEXUS_WORK") or nexus_home() / "work").expanduser().resolve()


def data_root() -> Path:
    """Root of ``raw/`` and ``processed/`` datasets (``NEXUS_DATA``, default ``./data``)."""
    return Path(os.environ.get("NEXUS_DATA", "data")).expanduser().resolve()


def mlflow_uri() -> str:
    """MLflow tracking URI: ``MLFLOW_TRACKING_URI`` if set, else SQLite under ``NEXUS_HOME``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{_state_file('mlflow.db')}"


def catalog_url() -> str:
    """SQLAlchemy URL of the catalog: ``NEXUS_CATALOG_URL`` if set, else SQLite under ``NEXUS_HOME``."""
    return os.environ.get("NEXUS_CATALOG_URL") or f"sqlite:///{_state_file('catalog.db')}"


def configure_environment() -> None:
    """Set the offline, project-local defaults and create ``NEXUS_HOME``. Entry points call it first:
    ideally before prefect, litellm or mlflow is imported (litellm reads its variable at import; a
    Prefect imported earlier must reload its settings, see ``flows.common.prepare_process``).

    Only fills variables the user has not set, so real deployments override any of them.
    """
    home = nexus_home()
    home.mkdir(parents=True, exist_ok=True)
    defaults = {
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # the temporary API server of a plain `nexus run` can take >20 s to start on a busy 2-core box
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
        "PREFECT_LOCAL_STORAGE_PATH": str(home / "prefect" / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MLFLOW_TRACKING_URI": mlflow_uri(),
        # litellm fetches a price map from the network at import unless told not to.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "GIT_PYTHON_REFRESH": "quiet",
        # steps log through the "nexus" logger (StepContext.info): Prefect attaches its console and
        # API handlers to it, so those lines show under the task run in the Prefect UI
        "PREFECT_LOGGING_EXTRA_LOGGERS": "nexus",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def shell_exports() -> str:
    """``export NAME=value`` lines for the environment Nexus sets (sourced by deployments/up.sh)."""
    import shlex

    configure_environment()
    keys = ["NEXUS_HOME", "NEXUS_DATA", "PREFECT_HOME", "PREFECT_RESULTS_PERSIST_BY_DEFAULT",
            "PREFECT_LOCAL_STORAGE_PATH", "MLFLOW_TRACKING_URI", "LITELLM_LOCAL_MODEL_COST_MAP",
            "HF_HUB_DISABLE_TELEMETRY", "TOKENIZERS_PARALLELISM", "DO_NOT_TRACK", "PREFECT_LOGGING_EXTRA_LOGGERS"]
    values = {"NEXUS_HOME": str(nexus_home()), "NEXUS_DATA": str(data_root())}
    return "\n".join(f"export {k}={shlex.quote(values.get(k) or os.environ[k])}" for k in keys)


if __name__ == "__main__":
    print(shell_exports())
