"""Starting Ray safely: a local instance reachable from this machine's loopback only, or the cluster
the user named with --address.

A local Ray (2.55) left to its defaults listens on every interface without authentication and its
GCS stores pickled actor classes, so a reachable port means running code as this user. Here:
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` makes Ray's node IP the loopback address, so the GCS,
  raylet, object manager, agents and workers bind 127.0.0.1 (measured: every listener of the
  process tree on 127.0.0.1; with the node IP alone, `::` and the host's address);
- token authentication (`RAY_AUTH_MODE=token`) with a fresh random token per run, handed to Ray's
  processes through their environment only;
- no dashboard; the temp folder is `$CNNSQL_HOME/ray`, mode 0700 (Ray makes its folders 0777). When
  that path is too long for Ray's Unix sockets (108 bytes), a fresh 0700 folder from mkdtemp in
  /tmp is used instead (said on stderr) and removed after the run.
Secrets never travel as actor arguments: `worker_dsn` strips the password and `worker_secrets`
writes it to a 0600 pgpass file inside that private folder, which libpq reads via PGPASSFILE.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path

from psycopg2.extensions import make_dsn

from cnnsql.core import config
from cnnsql import db
from cnnsql.core import safefs
from cnnsql.core.errors import CnnsqlError

LOOPBACK = "127.0.0.1"
# Ray's longest Unix socket: TEMP/session_YYYY-MM-DD_HH-MM-SS_UUUUUU_PID/sockets/plasma_store
SOCKET_TAIL = len("/session_2026-01-01_00-00-00_000000_4194304/sockets/plasma_store")
UNIX_PATH_MAX = 107


def temp_dir() -> Path:
    return config.state_dir() / "ray"


FALLBACK_PREFIX = "cnnsql-ray-"


def private_dir(path: Path | None = None) -> Path:
    """Ray's temp folder, mode 0700: $CNNSQL_HOME/ray, or a mkdtemp folder when that is too long."""
    path = path or temp_dir()
    if len(str(path)) + SOCKET_TAIL > UNIX_PATH_MAX:
        short = Path(tempfile.mkdtemp(prefix=FALLBACK_PREFIX))  # 0700, unpredictable name
        print(f"cnnsql: Ray's socket paths under {path} would be too long; using the private folder {short} "
              "for this run (set CNNSQL_HOME to a shorter path to keep it there)", file=sys.stderr)
        return short
    try:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise CnnsqlError(f"cannot create Ray's private folder {path}: {exc.strerror}",
                          "make CNNSQL_HOME writable or point it elsewhere") from None
    return path


def cleanup(path: Path | None) -> None:
    """After ray.shutdown(): the password file goes; a mkdtemp folder goes entirely."""
    if path is None:
        return
    (path / f"pgpass.{os.getpid()}").unlink(missing_ok=True)
    if path.name.startswith(FALLBACK_PREFIX) and path.parent == Path(tempfile.gettempdir()):
        shutil.rmtree(path, ignore_errors=True)


def loopback_environment() -> dict:
    """Environment for the local Ray processes (set before `import ray`: read at import)."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


def use_environment(env: dict) -> None:
    """Set Ray's environment in this process. Ray reads its authentication mode and token once, at
    import: when it was imported before (EvaDB imports it), its cached settings are reset so that it
    reads them again, else this process would talk without the token to processes that require it."""
    os.environ.update(env)
    if "ray._raylet" in sys.modules:
        from ray._raylet import AuthenticationTokenLoader, Config

        AuthenticationTokenLoader.instance().reset_cache()
        Config.initialize("")


def init(address: str | None, num_cpus: int) -> Path | None:
    """ray.init for cnnsql; returns the private temp folder of a local instance (None when remote)."""
    if address:
        import ray

        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ValueError ...
            raise CnnsqlError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0][:200]}",
                              "check --address and that `ray start --head` runs there") from None
        return None
    tmp = private_dir()
    use_environment(loopback_environment())
    import ray
    from ray._common import utils as ray_utils
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported before the environment was set
    ray_utils.try_make_directory_shared = lambda path: None  # keep Ray's folders owner-only
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address=LOOPBACK,
             _temp_dir=str(tmp))
    os.chmod(tmp, 0o700)
    return tmp


def worker_dsn(target: db.Target) -> str:
    """The DSN the actors get: the target's, without any password."""
    params = {k: v for k, v in target.params().items() if k not in db.SECRET_KEYS}
    return make_dsn(**params) if params else ""


def _pgpass_field(value: str | None) -> str:
    return (value or "*").replace("\\", "\\\\").replace(":", "\\:")


def worker_secrets(target: db.Target, private_dir: Path | None) -> dict:
    """Environment entries that let the actors' libpq find the password, never the password itself."""
    if target.private:
        return {"PGPASSFILE": str(db.private_cluster().pgpass)}
    password = target.params().get("password")
    if not password:
        return {}  # libpq's own PGPASSWORD / PGPASSFILE / ~/.pgpass of each node
    if private_dir is None:
        raise CnnsqlError("CNNSQL_DSN carries a password, which cnnsql does not send to a remote Ray cluster",
                          "remove it from CNNSQL_DSN and set PGPASSFILE or PGPASSWORD on every Ray node")
    p = target.params()
    line = ":".join(_pgpass_field(p.get(k)) for k in ("host", "port", "dbname", "user")) + ":" + _pgpass_field(password)
    path = private_dir / f"pgpass.{os.getpid()}"  # the run's process in its name: see sweep_password_files
    safefs.write_private(path, line + "\n", 0o600)
    return {"PGPASSFILE": str(path)}


def sweep_password_files() -> int:
    """Remove the DSN password files of Ray runs whose process is gone (killed before its cleanup):
    every command calls this first, so a password never outlives its run by more than that."""
    import psutil

    folder, removed = temp_dir(), 0
    if not folder.is_dir():
        return 0
    for path in folder.glob("pgpass*"):
        _, _, pid = path.name.partition(".")
        if not pid.isdigit() or not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
