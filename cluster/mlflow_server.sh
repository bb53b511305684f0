#!/usr/bin/env bash
# An MLflow tracking server with a database backend and an artifact store.
#
#   cluster/mlflow_server.sh start [--backend-store-uri URI] [--artifacts DIR_OR_URI] [--host 127.0.0.1] [--port 5000]
#   cluster/mlflow_server.sh stop
#
# Backend: SQLite by default (sqlite:///$STATE_DIR/mlflow.db); for a team server use PostgreSQL,
# e.g. --backend-store-uri postgresql://mlflow:PASSWORD@db-host:5432/mlflow (needs psycopg2-binary).
# Artifacts are served by the server (clients use mlflow-artifacts:/ URIs), stored under
# --artifacts (a folder, or s3://bucket/prefix with boto3 installed). The server binds 127.0.0.1
# unless --host says otherwise. Jobs find it through MLFLOW_TRACKING_URI=http://HOST:PORT.
set -euo pipefail

ACTION="${1:-}"; shift || true
STATE_DIR="${RAYDETR_MLFLOW_DIR:-.mlflow_server}"
HOST="127.0.0.1"
PORT=5000
BACKEND=""
ARTIFACTS=""
MLFLOW="${MLFLOW:-mlflow}"

while [ $# -gt 0 ]; do
  case "$1" in
    --backend-store-uri) BACKEND="$2"; shift 2 ;;
    --artifacts) ARTIFACTS="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

case "$ACTION" in
  start)
    mkdir -p "$STATE_DIR"
    STATE_ABS="$(cd "$STATE_DIR" && pwd)"
    BACKEND="${BACKEND:-sqlite:///$STATE_ABS/mlflow.db}"
    ARTIFACTS="${ARTIFACTS:-$STATE_ABS/artifacts}"
    nohup "$MLFLOW" server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
      --host "$HOST" --port "$PORT" > "$STATE_DIR/server.log" 2>&1 &
    echo $! > "$STATE_DIR/server.pid"
    for _ in $(seq 1 120); do
      if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$HOST:$PORT/health', timeout=2)" 2>/dev/null; then
        echo "MLflow tracking server at http://$HOST:$PORT (backend $BACKEND, artifacts $ARTIFACTS)"
        echo "export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
        exit 0
      fi
      sleep 1
    done
    echo "MLflow server did not answer within 120 s; see $STATE_DIR/server.log" >&2; exit 1
    ;;
  stop)
    if [ -f "$STATE_DIR/server.pid" ]; then
      PID="$(cat "$STATE_DIR/server.pid")"
      pkill -TERM -P "$PID" 2>/dev/null || true
      kill "$PID" 2>/dev/null || true
      rm -f "$STATE_DIR/server.pid"
      echo "MLflow server stopped"
    else
      echo "no MLflow server recorded in $STATE_DIR"
    fi
    ;;
  *)
    sed -n '2,11p' "$0"; exit 2 ;;
esac
