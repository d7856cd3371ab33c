#!/usr/bin/env bash
# Stop what `make up` started.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN="${NEXUS_HOME:-.nexus}/run"
for pidfile in "$RUN"/*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  # each piece was started with setsid: stop its whole process group (servers spawn children)
  kill -- -"$pid" 2>/dev/null || kill "$pid" 2>/dev/null
  echo "stopped $(basename "$pidfile" .pid)"
  rm -f "$pidfile"
done
