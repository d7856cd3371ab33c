#!/usr/bin/env bash
# Start the long-running pieces: Prefect server, a `local` process work pool and worker, the MLflow
# UI and the Streamlit app; register every deployment in prefect.yaml. `make down` stops them.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="$PWD/.venv/bin"
eval "$("$BIN/python" -m nexus_core.settings)"
export NEXUS_REPO="$PWD"
export PREFECT_API_URL="http://127.0.0.1:${PREFECT_PORT:-4200}/api"
RUN="$NEXUS_HOME/run"
mkdir -p "$RUN"

start() {  # start NAME CMD...: background process, pid and log under $RUN
  local name=$1; shift
  if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
    echo "$name already running"; return
  fi
  setsid nohup "$@" >"$RUN/$name.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
  echo "started $name (log: $RUN/$name.log)"
}

wait_http() {  # wait_http URL SECONDS
  for _ in $(seq "$2"); do
    if "$BIN/python" -c "import sys,urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)" "$1" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  echo "timed out waiting for $1" >&2; return 1
}

# >>> dashboard (tests/reliability/test_dashboards.py runs this block with a stub `start`)
# Bound to NEXUS_DASHBOARD_HOST (default 127.0.0.1); any other address needs an OIDC [auth] section in
# .streamlit/secrets.toml, or this refuses to start it (dashboards/serve.py). Usage statistics off.
DASHBOARD_URL="(not started)"
if [ -f dashboards/app.py ]; then
  DASHBOARD_CMD=$("$BIN/python" -m dashboards.serve command "$BIN/streamlit") || exit 2
  DASHBOARD_URL=$("$BIN/python" -m dashboards.serve url) || exit 2
  mapfile -t dashboard_args <<<"$DASHBOARD_CMD"
  start streamlit "${dashboard_args[@]}"
fi
# <<< dashboard
# Prefect and MLflow UIs have no login: loopback only (from elsewhere, use an SSH tunnel).
start prefect-server "$BIN/prefect" server start --host 127.0.0.1 --port "${PREFECT_PORT:-4200}"
wait_http "$PREFECT_API_URL/health" 120
"$BIN/prefect" work-pool inspect local >/dev/null 2>&1 || "$BIN/prefect" work-pool create local --type process
start worker "$BIN/prefect" worker start --pool local
start mlflow "$BIN/mlflow" ui --backend-store-uri "$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port "${MLFLOW_PORT:-5000}"
"$BIN/prefect" --no-prompt deploy --all

{ "$BIN/python" -m nexus_core.settings; echo "export PREFECT_API_URL=$PREFECT_API_URL"; echo "export NEXUS_REPO=$NEXUS_REPO"; } >"$NEXUS_HOME/env.sh"
cat <<MSG

Nexus is up.
  Prefect UI   http://127.0.0.1:${PREFECT_PORT:-4200}
  MLflow UI    http://127.0.0.1:${MLFLOW_PORT:-5000}
  Streamlit    $DASHBOARD_URL
In a shell:    source $NEXUS_HOME/env.sh && prefect deployment run 'lifecycle/tiny'
Stop:          make down
MSG
