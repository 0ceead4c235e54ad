"""PgBouncer in front of the private cluster (`cnnsql db pooler start|stop|status|url`): how PostgreSQL
is served to many clients. Each backend that runs an in-PostgreSQL CNN function loads its framework
(about 440 MB for PyTorch, 870 MB for TensorFlow) and takes 1-1.5 s to answer its first query; with
transaction pooling, N clients share `pool size` backends (default: one per core), so memory and warm-up
stop growing with the clients.

Set-up, all under <state>/pg/pgbouncer/ (0700, the server's user's; files 0600, written without
following links): pgbouncer.ini, the auth file with the cluster role's SCRAM secret (read from
pg_authid: no clear-text password is stored there; PgBouncer passes the client's SCRAM proof on to the
server), a pgpass line for the pooler's port beside the cluster's, pid and log files. It listens on
127.0.0.1 only (a port from 6432 up, or CNNSQL_POOLER_PORT), no Unix socket, auth scram-sha-256,
pool_mode transaction, and reaches the server over the cluster's private Unix socket. Run as the
server's user (as root: 'postgres'), started with a minimal environment like the server.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cnnsql.core import safefs
from cnnsql.core.errors import CnnsqlError
from cnnsql.db.pgcluster import SUPERUSER, PrivateCluster, _port_free, _valid_port

PORTS = range(6432, 6532)
BINARIES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


def pgbouncer_bin() -> str:
    for path in BINARIES:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("pgbouncer")
    if found:
        return found
    raise CnnsqlError("PgBouncer is not installed", "apt-get install pgbouncer (or run scripts/system-deps.sh pgbouncer "
                      "as root)")


class Pooler:
    def __init__(self, cluster: PrivateCluster):
        self.cluster = cluster
        self.dir = cluster.root / "pgbouncer"
        self.ini = self.dir / "pgbouncer.ini"
        self.auth_file = self.dir / "userlist.txt"
        self.pidfile = self.dir / "pgbouncer.pid"
        self.logfile = self.dir / "pgbouncer.log"
        self.port_file = self.dir / "port"
        self.pgpass = cluster.root / "pooler-pgpass"

    # --- state ---------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        try:
            return _valid_port(self.port_file.read_text().strip(), str(self.port_file))
        except OSError:
            raise CnnsqlError("the pooler is not set up", "run `cnnsql db pooler start`") from None

    def _pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def status(self) -> bool:
        pid = self._pid()
        if pid is None:
            return False
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return any(Path(a.decode(errors="replace")).name == "pgbouncer" for a in cmdline[:1]) and \
            str(self.ini).encode() in cmdline

    def _choose_port(self) -> int:
        wanted = os.environ.get("CNNSQL_POOLER_PORT")
        if wanted:
            port = _valid_port(wanted, "CNNSQL_POOLER_PORT")
            if not _port_free(port, reuse_addr=True):
                raise CnnsqlError(f"CNNSQL_POOLER_PORT={port} is in use by another program",
                                  "choose a free port or unset CNNSQL_POOLER_PORT")
            return port
        try:  # the pooler's own port again, so a client's URL outlives a restart
            previous = _valid_port(self.port_file.read_text().strip(), str(self.port_file))
            if _port_free(previous, reuse_addr=True):
                return previous
        except (OSError, CnnsqlError):
            pass
        for port in PORTS:
            if _port_free(port, reuse_addr=True):
                return port
        raise CnnsqlError(f"no free TCP port in {PORTS.start}-{PORTS.stop - 1} for the pooler", "set CNNSQL_POOLER_PORT")

    # --- start / stop ----------------------------------------------------------------------------
    def start(self, pool_size: int | None = None, max_clients: int = 200) -> None:
        binary = pgbouncer_bin()
        cluster = self.cluster
        cluster.start()
        if self.status():
            return
        pool = pool_size or os.cpu_count() or 1
        if not 1 <= pool <= 256 or not 1 <= max_clients <= 10000:
            raise CnnsqlError(f"pool size {pool} / max clients {max_clients} out of range", "pool 1-256, clients 1-10000")
        cluster.check_state()
        safefs.private_dir(self.dir, 0o700, *cluster._owner())
        secret = self._scram_secret()
        owner = cluster._owner()
        safefs.write_private(self.auth_file, f'"{SUPERUSER}" "{secret}"\n', 0o600, *owner)
        port = self._choose_port()
        settings = {
            "listen_addr": "127.0.0.1", "listen_port": port, "unix_socket_dir": "",
            "auth_type": "scram-sha-256", "auth_file": self.auth_file,
            "pool_mode": "transaction", "default_pool_size": pool, "min_pool_size": 0, "reserve_pool_size": 0,
            "max_client_conn": max_clients, "max_db_connections": pool,
            "server_reset_query": "", "ignore_startup_parameters": "extra_float_digits",
            "pidfile": self.pidfile, "logfile": self.logfile, "syslog": 0,
            "log_connections": 0, "log_disconnections": 0, "stats_period": 60,
            "query_wait_timeout": 60, "client_idle_timeout": 0, "server_lifetime": 86400, "server_idle_timeout": 0,
        }
        databases = f"* = host={cluster.socket_dir} port={cluster.port}"
        body = "[databases]\n" + databases + "\n\n[pgbouncer]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
        safefs.write_private(self.ini, body, 0o600, *owner)
        with safefs.open_append(self.logfile, 0o600, *owner):
            pass
        password = cluster._stored_password()
        safefs.write_private(self.pgpass, "".join(f"{h}:{port}:*:{SUPERUSER}:{password}\n"
                                                  for h in ("127.0.0.1", "localhost")), 0o600)
        proc = subprocess.run(cluster._cmd(binary, "-d", "-q", str(self.ini)), capture_output=True, text=True,
                              env=cluster.server_env(), cwd="/")
        if proc.returncode != 0:
            raise CnnsqlError(f"PgBouncer did not start: {(proc.stderr or proc.stdout).strip()[-300:]}",
                              f"see {self.logfile}")
        self._wait(port)
        safefs.write_private(self.port_file, str(port), 0o644)

    def _wait(self, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.1)
        raise CnnsqlError("PgBouncer started but does not accept connections", f"see {self.logfile}")

    def _scram_secret(self) -> str:
        import psycopg2

        conn = psycopg2.connect(**self.cluster.conninfo("postgres"))
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (SUPERUSER,))
                row = cur.fetchone()
        finally:
            conn.close()
        secret = row[0] if row else None
        if not secret or not secret.startswith("SCRAM-SHA-256$") or '"' in secret or "\n" in secret:
            raise CnnsqlError("the private cluster's role has no SCRAM secret", "run `cnnsql db stop` and "
                              "`cnnsql db start` (it sets a scram-sha-256 password)")
        return secret

    def stop(self) -> bool:
        """Safe shutdown (SIGINT: waits for the queries in flight), then gone within 30 s."""
        if not self.status():
            return False
        pid = self._pid()
        os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and self.status():
            time.sleep(0.1)
        if self.status():
            os.kill(pid, signal.SIGTERM)
        return True

    def conninfo(self, dbname: str) -> dict:
        return {"host": "127.0.0.1", "port": str(self.port), "user": SUPERUSER, "dbname": dbname,
                "passfile": str(self.pgpass)}
