#!/bin/sh
# The compose stack's job, in the app container: the database password from the secret file, CIFAR-10
# from /data/cifar when its archive is mounted there (else synthetic images, said so), then
# `cnnsql bench` with BENCH_ARGS. The run is logged to the PostgreSQL container (CNNSQL_DSN) and the
# session's JSON file is written to /results (a folder mounted from the host).
set -eu
# libpq reads the password from a pgpass file: EvaDB connects with an explicit empty password, which
# makes libpq skip PGPASSWORD but read PGPASSFILE. The file is in /dev/shm (memory, this container's own).
secret=/run/secrets/pg_password
if [ -z "${PGPASSFILE:-}" ] && [ -r "$secret" ]; then
    PGPASSFILE=/dev/shm/cnnsql-pgpass
    (umask 077 && printf '*:*:*:*:%s\n' "$(sed 's/\\/\\\\/g; s/:/\\:/g' "$secret")" > "$PGPASSFILE")
    export PGPASSFILE
fi
archive=/data/cifar/cifar-10-python.tar.gz
if [ -f "$archive" ]; then
    export CIFAR10_PATH="$archive"
    echo "cnnsql-docker-bench: CIFAR-10 from the mounted archive (read-only)"
else
    echo "cnnsql-docker-bench: no archive at $archive: ${SYNTHETIC_IMAGES:-2000} synthetic training images"
    cnnsql load --quiet --synthetic "${SYNTHETIC_IMAGES:-2000}"
fi
# shellcheck disable=SC2086  # BENCH_ARGS is a list of options
exec cnnsql bench ${BENCH_ARGS:-} "$@"
