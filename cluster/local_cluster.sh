#!/usr/bin/env bash
# A local multi-node Ray cluster on this machine: one head node and N worker nodes (`ray start`).
#
#   cluster/local_cluster.sh start [--workers N] [--cpus-per-node C] [--dashboard-host 127.0.0.1] [--port 6379]
#                                  [--dashboard-port 8265] [--client-port 10001] [--agent-port 52365]
#   cluster/local_cluster.sh status
#   cluster/local_cluster.sh stop
#
# The dashboard (and the Job Submission API: `detr submit --address http://127.0.0.1:8265`)
# binds to 127.0.0.1 unless --dashboard-host says otherwise. Node addresses stay at Ray's
# default (this machine's interface), so every node uses Ray's token authentication
# (RAY_AUTH_MODE=token, the token in ~/.ray/auth_token, generated when missing); clients
# on this machine (`detr submit`, `ray status`) find that token once they are in token
# mode: `export RAY_AUTH_MODE=token`. A second cluster on the same machine needs ports of its
# own: --port, --dashboard-port, --client-port (Ray Client) and --agent-port (each node's
# dashboard agent: the head's, then one more per worker). State lives in
# $RAYDETR_CLUSTER_DIR (default .local_cluster/): the Ray temp folder and the head's address.
set -euo pipefail

ACTION="${1:-}"; shift || true
WORKERS=1
CPUS=""
DASHBOARD_HOST="127.0.0.1"
DASHBOARD_PORT=8265
CLIENT_PORT=10001
AGENT_PORT=52365
PORT=6379
STATE_DIR="${RAYDETR_CLUSTER_DIR:-.local_cluster}"
RAY="${RAY:-ray}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"

while [ $# -gt 0 ]; do
  case "$1" in
    --workers) WORKERS="$2"; shift 2 ;;
    --cpus-per-node) CPUS="$2"; shift 2 ;;
    --dashboard-host) DASHBOARD_HOST="$2"; shift 2 ;;
    --dashboard-port) DASHBOARD_PORT="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --client-port) CLIENT_PORT="$2"; shift 2 ;;
    --agent-port) AGENT_PORT="$2"; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

cpu_flag() { if [ -n "$CPUS" ]; then echo "--num-cpus=$CPUS"; fi; }

case "$ACTION" in
  start)
    mkdir -p "$STATE_DIR"
    TEMP_DIR="$(cd "$STATE_DIR" && pwd)/ray"
    export RAY_USAGE_STATS_ENABLED=0
    if [ "$RAY_AUTH_MODE" = token ]; then "$RAY" get-auth-token --generate > /dev/null; fi
    "$RAY" start --head --port="$PORT" $(cpu_flag) \
      --dashboard-host="$DASHBOARD_HOST" --dashboard-port="$DASHBOARD_PORT" \
      --ray-client-server-port="$CLIENT_PORT" --dashboard-agent-listen-port="$AGENT_PORT" \
      --temp-dir="$TEMP_DIR" --disable-usage-stats
    HEAD_IP="$("$RAY" get-head-ip 2>/dev/null || true)"
    ADDRESS="$(python3 - "$TEMP_DIR" <<'PY'
import json, sys, pathlib
info = pathlib.Path(sys.argv[1]) / "ray_current_cluster"
print(info.read_text().strip() if info.exists() else "")
PY
)"
    [ -n "$ADDRESS" ] || ADDRESS="${HEAD_IP:-127.0.0.1}:$PORT"
    echo "$ADDRESS" > "$STATE_DIR/address"
    # Each worker node keeps its sessions, logs and runtime environments in a folder of its own, as a node of a
    # real cluster does on its own disk: nodes sharing one, their runtime-env agents unpacked and deleted job
    # code and environments in the same place (a job's working directory vanished under it).
    for i in $(seq 1 "$WORKERS"); do
      "$RAY" start --address="$ADDRESS" $(cpu_flag) --temp-dir="$TEMP_DIR-worker-$i" --disable-usage-stats \
        --dashboard-agent-listen-port="$((AGENT_PORT + i))"
    done
    # `ray start` returns before a worker has registered; wait until every node is active.
    EXPECTED=$((WORKERS + 1))
    for _ in $(seq 1 120); do
      ACTIVE="$("$RAY" status --address="$ADDRESS" 2>/dev/null | sed -n '/^Active:/,/^Pending:/p' | grep -c 'node_' || true)"
      [ "$ACTIVE" -ge "$EXPECTED" ] && break
      sleep 1
    done
    if [ "$ACTIVE" -lt "$EXPECTED" ]; then
      echo "only $ACTIVE of $EXPECTED nodes became active within 120 s" >&2; exit 1
    fi
    echo "Ray cluster: head + $WORKERS worker node(s) at $ADDRESS"
    echo "dashboard / job submission: http://$DASHBOARD_HOST:$DASHBOARD_PORT"
    if [ "$RAY_AUTH_MODE" = token ]; then echo "clients: export RAY_AUTH_MODE=token (the token: ~/.ray/auth_token)"; fi
    ;;
  status)
    ADDRESS="$(cat "$STATE_DIR/address" 2>/dev/null || true)"
    if [ -z "$ADDRESS" ]; then echo "no local cluster recorded in $STATE_DIR"; exit 1; fi
    "$RAY" status --address="$ADDRESS"
    ;;
  stop)
    # Only this cluster's nodes (not `ray stop`, which stops every Ray on the machine): their processes name
    # its temp folders ($ROOT for the head, $ROOT-worker-N for the workers) on their command lines.
    STATE_PATH="$(cd "$STATE_DIR" 2>/dev/null && pwd)" || { echo "no local Ray cluster in $STATE_DIR"; exit 0; }
    ROOT="$STATE_PATH/ray"
    pkill -TERM -f -- "$ROOT" || true  # then ten seconds, as `ray stop` gives its own grace period, before SIGKILL
    for _ in $(seq 1 10); do pgrep -f -- "$ROOT" > /dev/null || break; sleep 1; done
    pkill -KILL -f -- "$ROOT" || true
    for _ in $(seq 1 50); do pgrep -f -- "$ROOT" > /dev/null || break; sleep 0.2; done  # SIGKILL lands asynchronously
    rm -f "$STATE_DIR/address"
    echo "local Ray cluster stopped"
    ;;
  *)
    sed -n '2,14p' "$0"; exit 2 ;;
esac
