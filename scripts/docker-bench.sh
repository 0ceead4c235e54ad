#!/usr/bin/env bash
# The container set-up's main job (make docker-bench): build the app image and PostgreSQL 15's, run
# `cnnsql bench` on a reduced setting in the app container against the PostgreSQL container on a
# private network, data mounted read-only, the session's JSON file written to a host folder; then
# remove containers, network, volumes and secret (what `docker compose down -v` removes) and fail if
# any is left.
#
# Engine: `docker compose` (docker/docker-compose.yml) where a Docker engine answers, else podman with
# the same steps scripted (installed as root with apt-get when missing). Bases: the official
# python:3.11-slim-bookworm and postgres:15 when they can be pulled, else made from Debian packages by
# scripts/docker-base.sh. Settings (environment):
#   CIFAR_ARCHIVE      cifar-10-python.tar.gz to mount read-only (default docker/data/...; none: synthetic)
#   RESULTS_DIR        host folder for the session JSON (default docker/results)
#   BENCH_ARGS         cnnsql bench options (default: the reduced setting below)
#   POSTGRES_PASSWORD  the database password (default: a random one for this run, never written to disk)
#   ENGINE             docker|podman to choose
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
export BENCH_ARGS="${BENCH_ARGS:---limit 300 --sample 8 --repetitions 1 --warmup 1 --batch-sizes 16,64 --single-stream 5 --sql-single-stream 1}"
RESULTS_DIR="$(mkdir -p "${RESULTS_DIR:-docker/results}" && cd "${RESULTS_DIR:-docker/results}" && pwd)"
CIFAR_ARCHIVE="${CIFAR_ARCHIVE:-docker/data/cifar-10-python.tar.gz}"
APP_IMAGE=localhost/cnnsql-app:latest
say() { echo "docker-bench: $*" >&2; }
t_start=$SECONDS

if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    POSTGRES_PASSWORD="$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')"
fi
export POSTGRES_PASSWORD
# the app runs as uid 1000 in its image: as root, give it the results folder
[ "$(id -u)" = 0 ] && chown 1000:1000 "$RESULTS_DIR"
before="$(ls "$RESULTS_DIR")"

engine="${ENGINE:-}"
if [ -z "$engine" ]; then
    if command -v docker >/dev/null && docker compose version >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        engine=docker
    else
        engine=podman
    fi
fi

if [ "$engine" = docker ]; then
    say "engine: docker compose ($(docker compose version --short)), Docker $(docker info --format '{{.ServerVersion}}')"
    export CNNSQL_DOCKER_RESULTS="$RESULTS_DIR"
    if [ -f "$CIFAR_ARCHIVE" ]; then
        CNNSQL_DOCKER_DATA="$(cd "$(dirname "$CIFAR_ARCHIVE")" && pwd)"
        export CNNSQL_DOCKER_DATA
    fi
    compose=(docker compose -f docker/docker-compose.yml)
    trap '"${compose[@]}" down -v --remove-orphans' EXIT
    "${compose[@]}" build
    "${compose[@]}" up --abort-on-container-exit --exit-code-from app
else
    # --- podman, the compose file's steps scripted ---------------------------------------------
    if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v mmdebstrap >/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            say "installing podman, runc and mmdebstrap (apt-get)"
            t0=$SECONDS
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap; } >/dev/null
            say "installed in $((SECONDS - t0)) s"
        else
            echo "docker-bench: error: no Docker engine and no podman (as root: apt-get install podman runc mmdebstrap)" >&2
            exit 1
        fi
    fi
    # runc, with limits the runtime may set: where the machine withholds CAP_SYS_RESOURCE, podman's
    # default limits (above the host's hard ones) make every container fail to start.
    nofile="$(ulimit -Hn)"; [ "$nofile" = unlimited ] && nofile=1048576
    run_opts=(--ulimit "nofile=$nofile:$nofile" --ulimit "nproc=4096:4096")
    pm=(podman --runtime "${PODMAN_RUNTIME:-runc}")
    say "engine: $(podman --version), runtime ${PODMAN_RUNTIME:-runc} (compose file's steps scripted)"
    net=cnnsql_db; pg=cnnsql-postgres; secret=cnnsql_pg_password
    tmp="$(mktemp -d)"
    # what `docker compose down -v` removes; one container at a time (podman 4.3's `rm -f A B` removes
    # neither when B does not exist)
    cleanup() {
        local c
        for c in cnnsql-app "$pg"; do "${pm[@]}" rm -f -t 5 "$c" >/dev/null 2>&1 || true; done
        "${pm[@]}" network rm "$net" >/dev/null 2>&1 || true
        "${pm[@]}" volume rm cnnsql_pgdata cnnsql_weights >/dev/null 2>&1 || true
        "${pm[@]}" secret rm "$secret" >/dev/null 2>&1 || true
    }
    leftovers() {
        { "${pm[@]}" ps -a --format '{{.Names}}'; "${pm[@]}" volume ls --format '{{.Name}}'
          "${pm[@]}" network ls --format '{{.Name}}'; "${pm[@]}" secret ls --format '{{.Name}}'; } | grep -E '^cnnsql[-_]' || true
    }
    trap 'cleanup; rm -rf "$tmp"; left="$(leftovers)"; [ -z "$left" ] || say "left behind: $left"' EXIT
    trap 'exit 130' INT TERM
    cleanup

    # bases: the official images when they can be pulled, else Debian's packages
    python_base="${CNNSQL_PYTHON_BASE:-}"; postgres_image="${CNNSQL_POSTGRES_IMAGE:-}"
    if [ -z "$python_base" ] || [ -z "$postgres_image" ]; then
        if timeout 120 podman pull -q docker.io/library/python:3.11-slim-bookworm >/dev/null 2>&1 \
            && timeout 120 podman pull -q docker.io/library/postgres:15 >/dev/null 2>&1; then
            python_base="${python_base:-docker.io/library/python:3.11-slim-bookworm}"
            postgres_image="${postgres_image:-docker.io/library/postgres:15}"
        else
            say "the official images cannot be pulled: bases from Debian packages (scripts/docker-base.sh)"
            bash scripts/docker-base.sh podman
            python_base="${python_base:-localhost/cnnsql-python:3.11-bookworm}"
            postgres_image="${postgres_image:-localhost/cnnsql-postgres:15-bookworm}"
        fi
    fi

    # pip in the build as the host's pip: its settings (config files and PIP_* variables) written to a
    # temporary pip.conf mounted at /etc/pip.conf, and the local folders and files they name (wheel
    # folders such as the one holding torch's CPU build, file:// indexes, the CA bundle, constraints)
    # mounted read-only at the same paths. Mounts are not part of the image.
    build_opts=(--build-arg "BASE=$python_base")
    hostpy="$repo/.venv/bin/python"; [ -x "$hostpy" ] || hostpy=python3
    mapfile -t pip_paths < <("$hostpy" - "$tmp/pip.conf" <<'PY'
import ast, os, subprocess, sys, urllib.parse
# `pip config list` prints section.key='value' for the config files and :env:.key for PIP_* variables;
# pip's order: the install section over global, the environment over both
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
keep = {"index-url", "extra-index-url", "find-links", "no-index", "trusted-host", "cert", "client-cert",
        "constraint", "timeout", "default-timeout", "retries", "proxy", "prefer-binary", "only-binary"}
rank, vals = {"global": 0, "install": 1, ":env:": 2}, {}
for line in listed.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.partition(".")
    if section in rank and name in keep and rank[section] >= vals.get(name, (-1, ""))[0]:
        vals[name] = (rank[section], ast.literal_eval(value))
with open(sys.argv[1], "w") as f:
    f.write("[global]\n" + "".join(f"{k} = {' '.join(v.split())}\n" for k, (_, v) in sorted(vals.items())))
paths = set()
for name in ("index-url", "extra-index-url", "find-links", "cert", "client-cert", "constraint"):
    for item in vals.get(name, (0, ""))[1].split():
        path = urllib.parse.unquote(urllib.parse.urlparse(item).path) if item.startswith("file:") else item
        if not os.path.isabs(path) or not os.path.exists(path):
            continue
        if name.endswith("index-url"):  # a local index's pages link to files beside it (../../files)
            path = os.path.dirname(path.rstrip("/")) or path
        paths.add(os.path.normpath(path))
print("\n".join(sorted(p for p in paths if p != "/")))
PY
)
    build_opts+=(-v "$tmp/pip.conf:/etc/pip.conf:ro")
    for p in "${pip_paths[@]}"; do build_opts+=(-v "$p:$p:ro"); done
    say "pip: the host's settings ($(grep -c = "$tmp/pip.conf") in /etc/pip.conf for the build), ${#pip_paths[@]} local path(s) mounted read-only"
    # torch's CPU build: from PyTorch's CPU index (the Dockerfile's default), unless the host's pip
    # already finds it (e.g. a local wheel), then with the host's settings only
    torch_pin="$(sed -n 's/.*"\(torch==[^"]*\)".*/\1/p' pyproject.toml)"
    torch_url="$("$hostpy" -m pip install --dry-run --ignore-installed --no-deps --quiet --report - "$torch_pin" 2>/dev/null \
        | "$hostpy" -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["download_info"]["url"])' 2>/dev/null || true)"
    if [[ "$torch_url" == *%2Bcpu* || "$torch_url" == *+cpu* ]]; then
        build_opts+=(--build-arg TORCH_INDEX=)
        say "torch: the host's pip finds its CPU build (${torch_url##*/})"
    fi
    old_image="$("${pm[@]}" image inspect --format '{{.Id}}' "$APP_IMAGE" 2>/dev/null || true)"
    t0=$SECONDS
    "${pm[@]}" build --network host "${run_opts[@]}" "${build_opts[@]}" --iidfile "$tmp/iid" -f docker/Dockerfile \
        -t "$APP_IMAGE" .
    [ -s "$tmp/iid" ] || { say "the app image was not built"; exit 1; }
    # the image this build replaces (its layers that the new one shares stay)
    new_image="$(cat "$tmp/iid")"; new_image="${new_image#sha256:}"
    if [ -n "$old_image" ] && [ "$old_image" != "$new_image" ]; then
        "${pm[@]}" rmi "$old_image" >/dev/null 2>&1 || true
    fi
    say "app image built in $((SECONDS - t0)) s: $("${pm[@]}" image inspect --format '{{.Size}}' "$APP_IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"

    "${pm[@]}" network create --internal "$net" >/dev/null
    "${pm[@]}" volume create cnnsql_pgdata >/dev/null
    "${pm[@]}" volume create cnnsql_weights >/dev/null
    printf '%s' "$POSTGRES_PASSWORD" | "${pm[@]}" secret create "$secret" - >/dev/null
    "${pm[@]}" run -d --pull never --name "$pg" "${run_opts[@]}" --network "$net" --network-alias postgres \
        -e POSTGRES_USER=cnnsql -e POSTGRES_DB=cnnsql -e POSTGRES_PASSWORD_FILE=/run/secrets/pg_password \
        --secret "$secret,target=pg_password" -v cnnsql_pgdata:/var/lib/postgresql/data \
        --health-cmd 'pg_isready -h 127.0.0.1 -U cnnsql -d cnnsql' --health-interval disable \
        "$postgres_image" >/dev/null 2>"$tmp/postgres-run.err" || { cat "$tmp/postgres-run.err" >&2; exit 1; }
    # depends_on: condition: service_healthy, by running the health check until it passes (no
    # systemd timer: the script runs it)
    for i in $(seq 60); do
        "${pm[@]}" healthcheck run "$pg" >/dev/null 2>&1 && break
        [ "$i" = 60 ] && { "${pm[@]}" logs "$pg" >&2; say "PostgreSQL never became healthy"; exit 1; }
        sleep 2
    done
    say "PostgreSQL healthy ($postgres_image)"

    data_opts=()
    if [ -f "$CIFAR_ARCHIVE" ]; then
        data_opts=(-v "$(cd "$(dirname "$CIFAR_ARCHIVE")" && pwd)/$(basename "$CIFAR_ARCHIVE"):/data/cifar/cifar-10-python.tar.gz:ro")
    fi
    t0=$SECONDS
    "${pm[@]}" run --rm --pull never --name cnnsql-app "${run_opts[@]}" --network "$net" \
        -e CNNSQL_DSN=postgresql://cnnsql@postgres:5432/cnnsql -e BENCH_ARGS --secret "$secret,target=pg_password" \
        "${data_opts[@]}" -v cnnsql_weights:/data/weights -v "$RESULTS_DIR:/results" \
        --entrypoint cnnsql-docker-bench "$APP_IMAGE"
    say "benchmark in the container: $((SECONDS - t0)) s"
    runs="$(PGPASSWORD="$POSTGRES_PASSWORD" "${pm[@]}" exec -e PGPASSWORD "$pg" psql -h 127.0.0.1 -U cnnsql -d cnnsql -At \
        -c 'SELECT count(*) FROM bench_run')"
    say "runs logged in the PostgreSQL container's bench_run: $runs"
    [ "$runs" -gt 0 ] || { say "no runs logged in the container's PostgreSQL"; exit 1; }
    cleanup
    rm -rf "$tmp"
    trap - EXIT
    left="$(leftovers)"
    [ -z "$left" ] || { say "left behind after the run: $left"; exit 1; }
    say "containers, network, volumes and secret removed"
fi

new="$(comm -13 <(echo "$before") <(ls "$RESULTS_DIR"))"
[ -n "$new" ] || { say "no session JSON appeared in $RESULTS_DIR"; exit 1; }
say "session JSON on the host: $RESULTS_DIR/$new"
say "done in $((SECONDS - t_start)) s"
