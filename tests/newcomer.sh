#!/usr/bin/env bash
# What a newcomer runs, checked on a clean clone of the committed tree (nothing of this checkout's
# venv, state, results or environment): `make bench-sql`, then `make test`, then both again.
#
#   tests/newcomer.sh [ARCHIVE]
#
# ARCHIVE: CIFAR-10's cifar-10-python.tar.gz, given as CIFAR10_PATH as the README's Data section says.
# Without it the newcomer has no CIFAR-10 and loads synthetic data first (`cnnsql load --synthetic`),
# and the tests run on its synthetic path. The benchmark runs on a reduced setting (BENCH_ARGS);
# NEWCOMER_TEST is the make target of the first test run (default `test-data`, the tests whose path
# depends on the data loaded; `test` for the whole suite), the second is `test-fast`.
# Fails if any command fails, if the in-PostgreSQL columns are empty where PL/Python is installed, or
# if a run changed a tracked file.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="${1:-}"
bench_args="${BENCH_ARGS:---limit 300 --sample 8 --repetitions 1 --warmup 1 --batch-sizes 16,64 --single-stream 5 --sql-single-stream 1}"
first_test="${NEWCOMER_TEST:-test-data}"

work="$(mktemp -d /tmp/cnnsql-newcomer-XXXXXX)"
chmod 711 "$work"  # as root the private cluster runs as 'postgres', which must reach the clone
clone="$work/cnnsql"
cleanup() {
    status=$?
    [ -x "$clone/.venv/bin/cnnsql" ] && (cd "$clone" && .venv/bin/cnnsql db stop >/dev/null 2>&1 || true)
    if [ "$status" = 0 ]; then rm -rf "$work"; else echo "newcomer: FAILED; the clone is kept in $clone" >&2; fi
}
trap cleanup EXIT

# A newcomer's environment: none of ours
for var in $(env | sed -n 's/^\(CNNSQL_[A-Z_]*\|PG[A-Z]*\|CIFAR10_PATH\|KERAS_HOME\|TORCH_HOME\)=.*/\1/p'); do
    unset "$var"
done

step() { echo "newcomer: $(date +%H:%M:%S) $*" >&2; }
timed() { local t0=$SECONDS; "$@"; step "  done in $((SECONDS - t0)) s: $*"; }

git clone -q "$repo" "$clone"
cd "$clone"
if [ -n "$archive" ]; then
    export CIFAR10_PATH="$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")"
    step "CIFAR10_PATH=$CIFAR10_PATH"
else
    step "no CIFAR-10 archive: synthetic data first"
    timed make setup
    timed .venv/bin/cnnsql load --quiet --synthetic 2000
fi

bench() {
    make bench-sql BENCH_ARGS="$bench_args" 2>&1 | tee "$work/bench.log"
    if [ -f /usr/share/postgresql/15/extension/plpython3u.control ] && grep -q "^PG columns empty" "$work/bench.log"; then
        echo "newcomer: PL/Python is installed but the in-PostgreSQL columns are empty" >&2
        return 1
    fi
}

step "make bench-sql (1)"; timed bench
step "make $first_test (1)"; timed make "$first_test"
step "make bench-sql (2)"; timed bench
step "make test-fast (2)"; timed make test-fast

changed="$(git status --porcelain --untracked-files=no)"
if [ -n "$changed" ]; then
    echo "newcomer: the runs changed tracked files:" >&2
    echo "$changed" >&2
    exit 1
fi
step "passed; left for the user to commit on purpose: $(git status --porcelain | tr '\n' ' ')"
