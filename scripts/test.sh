#!/usr/bin/env bash
# Install everything the test suite needs into .venv, start the services it
# uses if they are down, and run the whole suite (under CI=true: from a bare copy of
# the repository, with ../shared/recordings passed in). `.ci/run` calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${CI:-}" in 1|true|TRUE|True|yes) ci=1 ;; *) ci=0 ;; esac

if [ "$ci" -eq 1 ] && [ -z "${TURNGATE_TEST_BARE_COPY:-}" ]; then
    # Under CI the whole suite runs once, from a bare copy of the repository: the
    # tracked (and untracked, not ignored) files only, in a fresh temporary folder with
    # no ../shared beside it. That is what a fresh clone sees, so a test that still
    # needs something outside the repository fails there.
    #
    # The provider recordings in ../shared/recordings (an extra corpus, required under
    # CI when they are there) are handed to that run by path, the one way a test may
    # reach outside the copy; without ../shared/recordings they become optional.
    #
    # The copy runs its own scripts/test.sh, so it builds its own .venv and runs its own
    # `npm ci`: this tree's editable install points at this tree, so the copy's imports,
    # entry points and `turngate` script would load this tree's code, not the copy's. CI
    # stays true, so PostgreSQL, Redis, Node and Chromium are still required and a
    # skipped test still fails the run (tests/conftest.py).
    recordings=$(cd .. && pwd)/shared/recordings
    if [ -d "$recordings" ]; then
        recordings_env=(TURNGATE_TEST_RECORDINGS_DIR="$recordings" TURNGATE_TEST_RECORDINGS=required)
    else
        recordings_env=(TURNGATE_TEST_RECORDINGS=optional)
    fi
    bare=$(mktemp -d "${TMPDIR:-/tmp}/turngate-bare.XXXXXX")
    trap 'rm -rf "$bare"' EXIT
    mkdir "$bare/turngate"
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -z --cached --others --exclude-standard \
            | while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done \
            | rsync -a --from0 --files-from=- ./ "$bare/turngate/"
    else
        rsync -a --exclude .venv --exclude node_modules --exclude test-artifacts \
            --exclude __pycache__ --exclude '*.db' ./ "$bare/turngate/"
    fi
    if [ -e "$bare/shared" ] || [ -e "$bare/turngate/.venv" ]; then
        echo "the bare copy in $bare is not bare" >&2
        exit 1
    fi
    echo "--- the whole suite, from a bare copy of the repository in $bare/turngate"
    (cd "$bare/turngate" && env -u TURNGATE_TEST_RECORDINGS_DIR -u TURNGATE_TEST_RECORDINGS \
        TURNGATE_TEST_BARE_COPY=1 "${recordings_env[@]}" bash scripts/test.sh "$@")
    exit $?
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
# A third-party adapter package, to prove the `turngate.adapters` entry point works.
.venv/bin/python -m pip install --quiet --disable-pip-version-check ./tests/third_party_adapter
# The example adapter package of docs/ADAPTERS.md; its own suite runs after the main one.
.venv/bin/python -m pip install --quiet --disable-pip-version-check ./examples/turngate-shout

# PostgreSQL (127.0.0.1:5432, trust auth) and Redis (127.0.0.1:6379).
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
    if command -v pg_ctlcluster >/dev/null 2>&1; then
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start || true
    fi
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    if command -v redis-server >/dev/null 2>&1; then
        mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
        redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
            --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    fi
    for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi

# Browser interop tests (npm packages pinned in tests/js/package-lock.json, Debian's chromium).
if [ -f tests/js/package-lock.json ]; then
    (cd tests/js && npm ci --no-audit --no-fund --loglevel=error)
    if ! command -v chromium >/dev/null 2>&1; then
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 || true
    fi
fi


# pytest "$@", with its exit code 5 (no tests collected) counted as a failure.
run_pytest() {
    set +e
    .venv/bin/python -m pytest "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests: that is a failure" >&2
        return 1
    fi
    return "$rc"
}


# Two pytest-xdist workers: a test spends much of its time waiting on servers,
# databases and browsers. TURNGATE_TEST_WORKERS sets another count (0: no workers,
# the suite runs in this process).
run_pytest -n "${TURNGATE_TEST_WORKERS:-2}" "$@"

# The example adapter's own suite (on turngate.testing), when the whole suite runs.
if [ "$#" -eq 0 ]; then
    (cd examples/turngate-shout && ../../.venv/bin/python -m pytest)
fi
