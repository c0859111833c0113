#!/usr/bin/env bash
# The local loop on a Debian/Ubuntu machine, from a fresh clone:
#
#   ./deploy/dev.sh demo [fleet demo options]   the local stack, migrations, then the demo
#   ./deploy/dev.sh test [pytest options]       the local stack, then the test suite
#
# Creates .venv (Python 3.11+) and installs the project into it when pyproject.toml has
# changed, then starts PostgreSQL/PostGIS, Redis, a Kafka-protocol broker and SeaweedFS
# (the documents' S3 storage) on loopback with `fleet services up` (which installs what
# is missing with apt-get).
# When PostgreSQL refuses the default login (user postgres, no password), `up` makes
# the project's own role and keeps its URL in .local/database.url; the commands run
# here then use it as FLEET_DATABASE_URL, unless the environment or .env sets one.
set -euo pipefail

cd "$(dirname "$0")/.."

VENV=.venv
STAMP="$VENV/.pyproject.sha256"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'dev.sh: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<'EOF'
usage: ./deploy/dev.sh demo [fleet demo options]
       ./deploy/dev.sh test [pytest options]   (default: the whole suite, -q)
EOF
    exit 2
}

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        say "needs root and sudo is not installed: $*"
        return 1
    fi
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null 2>&1 || { say "no apt-get on this machine; install $* yourself"; return 1; }
    say "installing $* with apt-get"
    if as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; then
        return 0
    fi
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "updating the package lists"
        as_root apt-get update -q >/dev/null || true
        APT_UPDATED=1
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null && return 0
    fi
    say "could not install $*"
    return 1
}

ensure_venv() {
    command -v python3 >/dev/null 2>&1 || die "python3 is not installed; install Python 3.11 or newer"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "python3 is $(python3 -V 2>&1 | cut -d' ' -f2); the project needs Python 3.11 or newer"
    if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import pip' >/dev/null 2>&1; then
        return 0
    fi
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        apt_install python3-venv || die "python3 has no venv module; install python3-venv"
    fi
    say "creating $VENV"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
}

ensure_install() {
    local hash
    hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$hash" ] && [ -x "$VENV/bin/fleet" ]; then
        say "project already installed in $VENV"
        return 0
    fi
    say "installing the project into $VENV (pip install -e '.[test,stack]')"
    local log="$VENV/pip-install.log"
    if ! { "$VENV/bin/python" -m pip install --upgrade pip \
            && "$VENV/bin/python" -m pip install -e '.[test,stack]'; } >"$log" 2>&1; then
        tail -n 25 "$log" >&2
        die "pip install failed; the whole output is in $log"
    fi
    printf '%s\n' "$hash" >"$STAMP"
}

ensure_test_tools() {
    # promtool checks the metrics output, docker-compose validates docker-compose.yml,
    # kubectl (when present) renders deploy/k8s; the tests that need them say so when
    # one is missing.
    command -v promtool >/dev/null 2>&1 || apt_install prometheus \
        || say "promtool is missing: the metrics format tests will fail"
    command -v docker-compose >/dev/null 2>&1 || apt_install docker-compose \
        || say "docker-compose is missing: the compose file test will be skipped"
    # The Redis Cluster tests start three redis-server nodes of their own and join them
    # with redis-cli --cluster create.
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server \
        || say "redis-server is missing: the Redis Cluster tests will fail"
    command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools \
        || say "redis-cli is missing: the Redis Cluster tests will fail"
}

use_project_role() {
    local url_file="${FLEET_STACK_DIR:-.local}/database.url"
    if [ -n "${FLEET_DATABASE_URL:-}" ] || grep -qs '^FLEET_DATABASE_URL=' .env || [ ! -s "$url_file" ]; then
        return 0
    fi
    FLEET_DATABASE_URL=$(cat "$url_file")
    export FLEET_DATABASE_URL
    say "using the project's PostgreSQL role: FLEET_DATABASE_URL from $url_file"
}

[ $# -ge 1 ] || usage
command=$1
shift

case "$command" in
    demo|test) ;;
    -h|--help|help) usage ;;
    *) say "unknown command: $command"; usage ;;
esac

ensure_venv
ensure_install
if [ "$command" = test ]; then
    ensure_test_tools
fi

say "starting the local stack (fleet services up)"
"$VENV/bin/fleet" services up
use_project_role

case "$command" in
    demo)
        say "applying the schema migrations (fleet migrate)"
        "$VENV/bin/fleet" migrate
        if "$VENV/bin/fleet" demo --help >/dev/null 2>&1; then
            say "running the demo (fleet demo); Ctrl-C stops it"
            exec "$VENV/bin/fleet" demo "$@"
        fi
        say "this version has no 'fleet demo' yet; the stack is up and migrated"
        ;;
    test)
        say "running the test suite"
        if [ $# -eq 0 ]; then
            set -- -q
        fi
        exec "$VENV/bin/python" -m pytest "$@"
        ;;
esac
