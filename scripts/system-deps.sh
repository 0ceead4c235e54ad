#!/usr/bin/env bash
# The Debian packages cnnsql's default runs use beyond the venv, installed where this machine allows it
# (root and apt-get); otherwise one line says what is missing and the exact command. Never fails the
# caller: what is missing only turns a placement or a test off, and the caller says so.
#   scripts/system-deps.sh plpython   # PL/Python 3 for the in-PostgreSQL placement (make setup)
#   scripts/system-deps.sh chromium   # headless chromium for the report's browser test (make test)
#   scripts/system-deps.sh pgbouncer  # PgBouncer for the pooled many-clients placement (cnnsql db pooler)
set -u
PG_MAJOR="${PG_MAJOR:-15}"

have() {
    case "$1" in
        plpython) test -f "/usr/share/postgresql/$PG_MAJOR/extension/plpython3u.control" ;;
        chromium) command -v chromium >/dev/null 2>&1 ;;
        pgbouncer) test -x /usr/sbin/pgbouncer || command -v pgbouncer >/dev/null 2>&1 ;;
    esac
}

for what in "$@"; do
    case "$what" in
        plpython) pkg="postgresql-plpython3-$PG_MAJOR"; use="the in-PostgreSQL placement (cnnsql db functions)" ;;
        chromium) pkg="chromium"; use="the report's browser test" ;;
        pgbouncer) pkg="pgbouncer"; use="the connection pooler for many clients (cnnsql db pooler)" ;;
        *) echo "system-deps.sh: unknown dependency $what" >&2; exit 2 ;;
    esac
    have "$what" && continue
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian package $pkg for $use (apt-get)" >&2
        if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg"; } >/dev/null 2>&1 \
            && have "$what"; then
            continue
        fi
        echo "cnnsql: warning: apt-get could not install $pkg; $use is skipped until it is installed (apt-get install $pkg)" >&2
    else
        echo "cnnsql: warning: $pkg is not installed; $use is skipped until it is (as root: apt-get install $pkg)" >&2
    fi
done
exit 0
