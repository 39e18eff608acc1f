#!/usr/bin/env bash
# Make sure the real PostgreSQL and Redis the service tests use are up.
# Starts them where this machine can (installing them from Debian's packages as root if missing);
# otherwise stops with the exact command to run. Never lets the service tests skip silently.
set -u
PG_HOST=${QDPO_TEST_PG_HOST:-127.0.0.1}
PG_PORT=${QDPO_TEST_PG_PORT:-5432}
REDIS_PORT=${QDPO_TEST_REDIS_PORT:-6379}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() {
  for _ in $(seq 1 30); do port_open "$1" "$2" && return 0; sleep 1; done
  return 1
}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

ensure_postgres() {
  port_open "$PG_HOST" "$PG_PORT" && return 0
  echo "PostgreSQL is not answering on $PG_HOST:$PG_PORT; starting it" >&2
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    as_root apt-get install -y -q postgresql >/dev/null 2>&1 || true
  fi
  if ls /etc/postgresql >/dev/null 2>&1; then
    as_root pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  fi
  if ! wait_port "$PG_HOST" "$PG_PORT"; then
    echo "ERROR: PostgreSQL is not running and could not be started. Run:" >&2
    echo "  sudo pg_ctlcluster --skip-systemctl-redirect \$(ls /etc/postgresql) main start" >&2
    echo "(or point QDPO_TEST_DATABASE_URL at a reachable server)" >&2
    return 1
  fi
}

ensure_redis() {
  port_open 127.0.0.1 "$REDIS_PORT" && return 0
  echo "Redis is not answering on 127.0.0.1:$REDIS_PORT; starting it" >&2
  command -v redis-server >/dev/null || as_root apt-get install -y -q redis-server >/dev/null 2>&1 || true
  if command -v redis-server >/dev/null; then
    mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 || \
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no >/dev/null 2>&1 || true
  fi
  if ! wait_port 127.0.0.1 "$REDIS_PORT"; then
    echo "ERROR: Redis is not running and could not be started. Run:" >&2
    echo "  redis-server --daemonize yes --bind 127.0.0.1 --port $REDIS_PORT --save '' --appendonly no" >&2
    return 1
  fi
}

ensure_postgres && ensure_redis || exit 1
echo "services: PostgreSQL $PG_HOST:$PG_PORT and Redis 127.0.0.1:$REDIS_PORT are up"
