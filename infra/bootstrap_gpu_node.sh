#!/usr/bin/env bash
# Prepare a machine to run Nexus work: install, environment, worker start.
#
#   infra/bootstrap_gpu_node.sh worker  POOL TYPE   # a long-lived worker host (any small VM): runs
#                                                    # `prefect worker start` for nexus-lambda / nexus-runpod /
#                                                    # process pools; GPU machines are launched per flow run
#   infra/bootstrap_gpu_node.sh gpu-node POOL        # a GPU box you own: a `process` worker on the box itself
#
# Environment (read, never printed): PREFECT_API_URL (+ PREFECT_API_KEY for Prefect Cloud),
# LAMBDA_API_KEY / RUNPOD_API_KEY for the cloud workers, MLFLOW_TRACKING_URI, NEXUS_CATALOG_URL,
# AWS_* for S3 results. Optional: NEXUS_REPO (default: this checkout), NEXUS_HOME (default ~/.nexus).
set -euo pipefail

MODE="${1:-}"; POOL="${2:-}"; TYPE="${3:-process}"
REPO="${NEXUS_REPO:-$(cd "$(dirname "$0")/.." && pwd)}"
export NEXUS_HOME="${NEXUS_HOME:-$HOME/.nexus}"

usage() { sed -n '2,11p' "$0"; exit 2; }
[[ -n "$MODE" && -n "$POOL" ]] || usage

need() { command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is required" >&2; exit 1; }; }
need_env() { [[ -n "${!1:-}" ]] || { echo "error: environment variable $1 is not set" >&2; exit 1; }; }

install() {
  command -v python3.11 >/dev/null || need python3
  cd "$REPO"
  if [[ ! -x .venv/bin/python ]]; then "$(command -v python3.11 || command -v python3)" -m venv .venv; fi
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.'
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt s3fs || \
    echo "warning: s3fs not installed: s3:// results and artifacts will not work" >&2
  # The nexus-lambda / nexus-runpod worker types come from this package's prefect.collections entry point.
  .venv/bin/python -c "import infra.workers" 
}

check_gpu() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    .venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'torch sees no GPU'; print('cuda ok:', torch.cuda.device_count(), 'GPU(s)')"
  else
    echo "error: nvidia-smi not found: this is not a GPU node (use 'worker' mode for a cloud worker host)" >&2
    exit 1
  fi
}

env_file() {
  # Everything the worker and its flow runs need, without echoing secrets to the terminal.
  mkdir -p "$NEXUS_HOME"
  ( cd "$REPO" && .venv/bin/python -m nexus_core.settings ) > "$NEXUS_HOME/env.sh"
  chmod 600 "$NEXUS_HOME/env.sh"
  # shellcheck disable=SC1091
  source "$NEXUS_HOME/env.sh"
}

case "$MODE" in
  worker)
    need_env PREFECT_API_URL
    case "$TYPE" in
      nexus-lambda) need_env LAMBDA_API_KEY ;;
      nexus-runpod) need_env RUNPOD_API_KEY ;;
    esac
    install; env_file
    cd "$REPO"
    .venv/bin/python -m infra.concurrency infra/concurrency.yaml || echo "warning: limits not applied" >&2
    exec .venv/bin/prefect worker start --pool "$POOL" --type "$TYPE" --with-healthcheck
    ;;
  gpu-node)
    need_env PREFECT_API_URL
    install; check_gpu; env_file
    cd "$REPO"
    exec .venv/bin/prefect worker start --pool "$POOL" --type process --limit 1
    ;;
  *) usage ;;
esac
