#!/usr/bin/env bash
# Base images made from Debian bookworm packages, for machines that cannot pull from a container
# registry (docker/Dockerfile and the compose stack otherwise use the official python:3.11-slim-bookworm
# and postgres:15 images):
#   localhost/cnnsql-python:3.11-bookworm  Debian's python3 (3.11), venv, pip and CA certificates
#   localhost/cnnsql-postgres:15-bookworm  Debian's postgresql-15, started like the official postgres
#                                          image (docker/postgres/entrypoint.sh: POSTGRES_USER, _DB,
#                                          _PASSWORD or _PASSWORD_FILE, PGDATA)
# Usage (root; needs mmdebstrap and the engine):  scripts/docker-base.sh podman|docker
# An image that already exists is kept (REBUILD=1 makes it again).
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${1:?usage: scripts/docker-base.sh podman|docker}"
PYTHON_BASE="${PYTHON_BASE:-localhost/cnnsql-python:3.11-bookworm}"
POSTGRES_BASE="${POSTGRES_BASE:-localhost/cnnsql-postgres:15-bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY:-http://deb.debian.org/debian-security}"
sources=("deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main")

command -v mmdebstrap >/dev/null || { echo "docker-base: mmdebstrap is missing (apt-get install mmdebstrap)" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

exists() { "$engine" image inspect "$1" >/dev/null 2>&1 && [ -z "${REBUILD:-}" ]; }
# no documentation, manual pages or translations in the images (copyright files stay)
slim=(--dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*'
      --dpkgopt='path-exclude=/usr/share/info/*' --aptopt='Acquire::Retries "3"')

python_base() {
    mmdebstrap --quiet --variant=minbase "${slim[@]}" --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$tmp/python.tar" "${sources[@]}"
    "$engine" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' "$tmp/python.tar" "$PYTHON_BASE" >/dev/null
}

postgres_base() {
    # the package's own cluster (15/main) is removed: the entrypoint initialises $PGDATA on first start
    mmdebstrap --quiet --variant=minbase "${slim[@]}" --include=postgresql-15,ca-certificates \
        --customize-hook='rm -rf "$1"/var/lib/postgresql/15/main "$1"/etc/postgresql/15/main' \
        --customize-hook='mkdir -p "$1"/var/lib/postgresql/data "$1"/docker-entrypoint-initdb.d' \
        --customize-hook='copy-in docker/postgres/entrypoint.sh /usr/local/bin' \
        bookworm "$tmp/postgres.tar" "${sources[@]}"
    "$engine" import --change 'ENV LANG=C.UTF-8' --change 'ENV PGDATA=/var/lib/postgresql/data' \
        --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENTRYPOINT ["/usr/local/bin/entrypoint.sh"]' --change 'EXPOSE 5432' \
        --change 'STOPSIGNAL SIGINT' "$tmp/postgres.tar" "$POSTGRES_BASE" >/dev/null
}

# the two are made side by side (each mostly waits on downloads and dpkg)
t0=$SECONDS
pids=(); names=()
for kind in python postgres; do
    image="$PYTHON_BASE"; [ "$kind" = postgres ] && image="$POSTGRES_BASE"
    if exists "$image"; then
        echo "docker-base: $image exists"
    else
        "${kind}_base" >"$tmp/$kind.log" 2>&1 &
        pids+=($!); names+=("$image")
    fi
done
failed=0
for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
        echo "docker-base: ${names[$i]} made from Debian packages ($((SECONDS - t0)) s)"
    else
        echo "docker-base: error: ${names[$i]} could not be made:" >&2
        tail -n 30 "$tmp/$( [ "${names[$i]}" = "$POSTGRES_BASE" ] && echo postgres || echo python ).log" >&2
        failed=1
    fi
done
exit "$failed"
