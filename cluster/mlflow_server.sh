#!/usr/bin/env bash
# An MLflow tracking server with a database backend and an artifact store.
#
#   cluster/mlflow_server.sh start [--backend-store-uri URI | --postgres] [--artifacts DIR_OR_URI]
#                                  [--host 127.0.0.1] [--port 5000] [--pg-port 5432] [--workers N]
#                                  [--auth] [--allowed-hosts HOST[,HOST...]]
#   cluster/mlflow_server.sh stop
#
# A team server should run with --auth: MLflow's basic-auth app, so that only users with a password
# can log runs, register versions or move an alias such as `champion` (which the label job runs).
# Its admin user is `admin`, with a password generated at the first start into
# $STATE_DIR/auth/admin_password (readable by this user only); create more users with MLflow's
# auth API. Jobs authenticate with MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD in their
# environment (a cluster gets them from a Secret, as it gets object-store credentials): never in a
# config file or on a command line, which MLflow and Ray record. --allowed-hosts: the host names
# clients use to reach the server (MLflow refuses others: DNS-rebinding protection).
#
# Backend: SQLite by default (sqlite:///$STATE_DIR/mlflow.db). A team server uses PostgreSQL:
#   --backend-store-uri postgresql://USER:PASSWORD@DB_HOST:5432/mlflow   an existing database, or
#   --postgres   a PostgreSQL server of its own in $STATE_DIR/postgres (initdb and pg_ctl on the PATH),
#                on 127.0.0.1:--pg-port, run as an unprivileged user (PostgreSQL refuses root: as root it
#                runs as $RAYDETR_PG_USER, default `postgres`), password in $STATE_DIR/postgres/password.
# Both need the driver: pip install 'raydetr[postgres]'.
# Artifacts are served by the server (clients use mlflow-artifacts:/ URIs, so jobs need no store
# credentials), stored under --artifacts: a folder, or s3://bucket/prefix (AWS_ACCESS_KEY_ID,
# AWS_SECRET_ACCESS_KEY and, for MinIO or another S3-compatible store, AWS_ENDPOINT_URL in this
# shell's environment), or gs://bucket/prefix. The server binds 127.0.0.1 unless --host says
# otherwise. Jobs find it through MLFLOW_TRACKING_URI=http://HOST:PORT. State: $RAYDETR_MLFLOW_DIR
# (default .mlflow_server/). --workers: the server's processes (default MLflow's).
set -euo pipefail

ACTION="${1:-}"; shift || true
STATE_DIR="${RAYDETR_MLFLOW_DIR:-.mlflow_server}"
HOST="127.0.0.1"
PORT=5000
PG_PORT=5432
BACKEND=""
POSTGRES=0
ARTIFACTS=""
WORKERS=()
AUTH=0
ALLOWED=()
MLFLOW="${MLFLOW:-mlflow}"
PG_USER="${RAYDETR_PG_USER:-postgres}"

while [ $# -gt 0 ]; do
  case "$1" in
    --backend-store-uri) BACKEND="$2"; shift 2 ;;
    --postgres) POSTGRES=1; shift ;;
    --pg-port) PG_PORT="$2"; shift 2 ;;
    --artifacts) ARTIFACTS="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --workers) WORKERS=(--workers "$2"); shift 2 ;;
    --auth) AUTH=1; shift ;;
    --allowed-hosts) ALLOWED=(--allowed-hosts "$2"); shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done

# Run a PostgreSQL tool as the unprivileged user when this shell is root.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$PG_USER" -- "$@"; else "$@"; fi
}

start_postgres() {
  local pg_dir="$1"
  local data="$pg_dir/data"
  mkdir -p "$pg_dir"
  if [ ! -f "$pg_dir/password" ]; then
    (umask 077; python3 -c "import secrets; print(secrets.token_hex(16))" > "$pg_dir/password")
  fi
  if [ "$(id -u)" = 0 ]; then
    chown "$PG_USER" "$pg_dir"
    chmod 700 "$pg_dir"
    chown "$PG_USER" "$pg_dir/password"
    if ! runuser -u "$PG_USER" -- test -x "$pg_dir"; then
      echo "PostgreSQL runs as $PG_USER, who cannot reach $pg_dir: choose a RAYDETR_MLFLOW_DIR whose parent folders it can enter" >&2
      exit 1
    fi
  fi
  if [ ! -f "$data/PG_VERSION" ]; then
    as_pg initdb -D "$data" -U mlflow --pwfile="$pg_dir/password" --auth-host=scram-sha-256 \
      --auth-local=scram-sha-256 > "$pg_dir/initdb.log" 2>&1 \
      || { echo "initdb failed; see $pg_dir/initdb.log" >&2; exit 1; }
  fi
  if as_pg pg_ctl -D "$data" status > /dev/null 2>&1; then
    PG_PORT="$(cat "$pg_dir/port")"  # already running (a server restarted without `stop`)
  else
    as_pg pg_ctl -D "$data" -l "$pg_dir/postgres.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $pg_dir" start > /dev/null \
      || { echo "PostgreSQL did not start; see $pg_dir/postgres.log" >&2; exit 1; }
  fi
  local password
  password="$(cat "$pg_dir/password")"
  if ! PGPASSWORD="$password" psql -h 127.0.0.1 -p "$PG_PORT" -U mlflow -d postgres -tAc \
      "SELECT 1 FROM pg_database WHERE datname='mlflow'" | grep -q 1; then
    PGPASSWORD="$password" createdb -h 127.0.0.1 -p "$PG_PORT" -U mlflow mlflow
  fi
  echo "$PG_PORT" > "$pg_dir/port"
  BACKEND="postgresql://mlflow:$password@127.0.0.1:$PG_PORT/mlflow"
}

case "$ACTION" in
  start)
    mkdir -p "$STATE_DIR"
    STATE_ABS="$(cd "$STATE_DIR" && pwd)"
    if [ "$POSTGRES" = 1 ]; then
      [ -z "$BACKEND" ] || { echo "--postgres starts its own database: leave out --backend-store-uri" >&2; exit 2; }
      start_postgres "$STATE_ABS/postgres"
    fi
    BACKEND="${BACKEND:-sqlite:///$STATE_ABS/mlflow.db}"
    ARTIFACTS="${ARTIFACTS:-$STATE_ABS/artifacts}"
    APP=()
    if [ "$AUTH" = 1 ]; then
      mkdir -p "$STATE_ABS/auth"
      chmod 700 "$STATE_ABS/auth"
      for secret in admin_password flask_secret_key; do  # the key signs the web UI's CSRF tokens
        if [ ! -f "$STATE_ABS/auth/$secret" ]; then
          (umask 077; python3 -c "import secrets; print(secrets.token_urlsafe(24))" > "$STATE_ABS/auth/$secret")
        fi
      done
      (umask 077; cat > "$STATE_ABS/auth/basic_auth.ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$STATE_ABS/auth/users.db
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
)
      export MLFLOW_AUTH_CONFIG_PATH="$STATE_ABS/auth/basic_auth.ini"
      MLFLOW_AUTH_ADMIN_PASSWORD="$(cat "$STATE_ABS/auth/admin_password")"
      MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE_ABS/auth/flask_secret_key")"
      export MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
      APP=(--app-name basic-auth)
    fi
    nohup "$MLFLOW" server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
      --host "$HOST" --port "$PORT" "${WORKERS[@]}" "${APP[@]}" "${ALLOWED[@]}" > "$STATE_DIR/server.log" 2>&1 &
    unset MLFLOW_AUTH_ADMIN_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
    echo $! > "$STATE_DIR/server.pid"
    SHOWN_BACKEND="$(echo "$BACKEND" | sed -E 's#://([^:/@]+):[^@]*@#://\1:***@#')"
    for _ in $(seq 1 120); do
      if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://$HOST:$PORT/health', timeout=2)" 2>/dev/null; then
        echo "MLflow tracking server at http://$HOST:$PORT (backend $SHOWN_BACKEND, artifacts $ARTIFACTS)"
        echo "export MLFLOW_TRACKING_URI=http://$HOST:$PORT"
        if [ "$AUTH" = 1 ]; then
          echo "basic auth: user admin, password in $STATE_ABS/auth/admin_password; jobs need"
          echo "export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD=\$(cat $STATE_ABS/auth/admin_password)"
        fi
        exit 0
      fi
      if ! kill -0 "$(cat "$STATE_DIR/server.pid")" 2>/dev/null; then
        echo "MLflow server exited; see $STATE_DIR/server.log" >&2; exit 1
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
      for _ in $(seq 1 30); do kill -0 "$PID" 2>/dev/null || break; sleep 1; done
      rm -f "$STATE_DIR/server.pid"
      echo "MLflow server stopped"
    else
      echo "no MLflow server recorded in $STATE_DIR"
    fi
    if [ -f "$STATE_DIR/postgres/data/postmaster.pid" ]; then
      as_pg pg_ctl -D "$(cd "$STATE_DIR" && pwd)/postgres/data" -m fast -w stop > /dev/null && echo "PostgreSQL stopped"
    fi
    ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
