#!/usr/bin/env bash
# Stop what `make up` started: TERM each process group, then KILL whatever is left after 15 s.
set -uo pipefail
cd "$(dirname "$0")/.."
RUN="${NEXUS_HOME:-.nexus}/run"
pids=()
for pidfile in "$RUN"/*.pid; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  # each piece was started with setsid, so its pid is its process group: servers spawn children
  kill -TERM -- -"$pid" 2>/dev/null && pids+=("$pid")
  echo "stopping $(basename "$pidfile" .pid)"
  rm -f "$pidfile"
done
for _ in $(seq 15); do
  alive=0
  for pid in "${pids[@]}"; do kill -0 -- -"$pid" 2>/dev/null && alive=1; done
  [ "$alive" = 0 ] && exit 0
  sleep 1
done
for pid in "${pids[@]}"; do kill -KILL -- -"$pid" 2>/dev/null; done
exit 0
