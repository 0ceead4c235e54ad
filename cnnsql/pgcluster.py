"""A private PostgreSQL 15 cluster under the state directory, owner-only files.

initdb refuses to run as root, so as root the server runs as the unprivileged `postgres`
user (or `nobody`) through setpriv; as a normal user it runs as that user.
Access: the Unix socket (directory mode 0700, so only its owner and root) with trust auth,
and loopback TCP (127.0.0.1 only), needed by EvaDB's SQLAlchemy URI, with a scram password
that is generated at init and kept in a 0600 pgpass file (libpq reads it via PGPASSFILE).
"""
from __future__ import annotations

import os
import pwd
import secrets
import socket
import shutil
import subprocess
import time
from pathlib import Path

from .errors import CnnsqlError

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin",)
SUPERUSER = "cnnsql"
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_permissions": "0700",
    "wal_level": "minimal",          # lets COPY into a table truncated in the same transaction skip WAL
    "max_wal_senders": "0",
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
    "logging_collector": "off",
}


def pg_bin(tool: str) -> str:
    env = os.environ.get("CNNSQL_PG_BIN")
    for d in ([env] if env else []) + list(PG_BIN_CANDIDATES):
        path = Path(d) / tool
        if path.is_file():
            return str(path)
    found = shutil.which(tool)
    if found:
        return found
    raise CnnsqlError(
        f"PostgreSQL server program {tool!r} not found",
        "install PostgreSQL 15 (Debian: apt-get install postgresql-15), set CNNSQL_PG_BIN, or point CNNSQL_DSN at a server",
    )


class PrivateCluster:
    def __init__(self, home: Path):
        self.root = Path(home) / "pg"
        self.data = self.root / "data"
        self.socket_dir = self.root / "run"
        self.logfile = self.root / "postgres.log"
        self.pgpass = self.root / "pgpass"
        self.port_file = self.root / "port"
        self.run_as = self._run_as_user()

    @staticmethod
    def _run_as_user() -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        for name in ("postgres", "nobody"):
            try:
                return pwd.getpwnam(name)
            except KeyError:
                continue
        raise CnnsqlError("running as root but no 'postgres' or 'nobody' user exists to own the cluster",
                          "create a 'postgres' user or set CNNSQL_DSN")

    def _cmd(self, *args: str) -> list[str]:
        if self.run_as is None:
            return list(args)
        u = self.run_as
        return ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups", "--", *args]

    def _run(self, *args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess:
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        for var in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE", "PGPASSWORD"):
            env.pop(var, None)
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, env=env, cwd="/", input=input)
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise CnnsqlError(
                f"{Path(args[0]).name} failed: {detail[-1] if detail else 'exit ' + str(proc.returncode)}",
                f"see {self.logfile}",
            )
        return proc

    def _own(self, path: Path, mode: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, mode)
        if self.run_as is not None:
            os.chown(path, self.run_as.pw_uid, self.run_as.pw_gid)

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    @property
    def port(self) -> int:
        return int(self.port_file.read_text())

    @staticmethod
    def _free_port() -> int:
        wanted = os.environ.get("CNNSQL_PG_PORT")
        if wanted:
            return int(wanted)
        for port in range(54320, 54420):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                    return port
                except OSError:
                    continue
        raise CnnsqlError("no free TCP port in 54320-54419 for the private cluster", "set CNNSQL_PG_PORT")

    def _check_socket_path(self) -> None:
        if len(str(self.socket_dir / ".s.PGSQL.54320")) > 100:
            raise CnnsqlError(f"socket path under {self.socket_dir} is too long for a Unix socket",
                              "set CNNSQL_HOME to a shorter path")

    def init(self) -> None:
        if self.initialized:
            return
        self._check_socket_path()
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755 if self.run_as else 0o700)
        self._own(self.data, 0o700)
        self._own(self.socket_dir, 0o700)
        if self.run_as is not None and self._run("test", "-w", str(self.data), check=False).returncode != 0:
            raise CnnsqlError(f"user {self.run_as.pw_name!r} cannot reach {self.data} (a parent directory is private)",
                              "set CNNSQL_HOME to a directory other users can traverse, e.g. /var/tmp/cnnsql")
        self._run(pg_bin("initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth=trust",
                  "--encoding=UTF8", "--no-instructions")
        port = self._free_port()
        conf = "\n".join(f"{k} = {v}" for k, v in SETTINGS.items())
        conf += f"\nunix_socket_directories = '{self.socket_dir}'\nport = {port}\n"
        with open(self.data / "postgresql.conf", "a") as f:
            f.write("\n# cnnsql private cluster\n" + conf)
        (self.data / "pg_hba.conf").write_text(
            "# socket: directory mode 0700, owner only. TCP: loopback only, password in pgpass (0600).\n"
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
        self.port_file.write_text(str(port))
        password = secrets.token_urlsafe(24)
        self._run(pg_bin("postgres"), "--single", "-D", str(self.data), "postgres",
                  input=f"ALTER ROLE {SUPERUSER} PASSWORD '{password}';\n")
        fd = os.open(self.pgpass, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"127.0.0.1:{port}:*:{SUPERUSER}:{password}\nlocalhost:{port}:*:{SUPERUSER}:{password}\n")

    def status(self) -> bool:
        if not self.initialized:
            return False
        return self._run(pg_bin("pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def start(self) -> None:
        self.init()
        if self.status():
            return
        self._own(self.socket_dir, 0o700)
        if not self.logfile.exists():
            self.logfile.touch(mode=0o600)
        if self.run_as is not None:
            os.chown(self.logfile, self.run_as.pw_uid, self.run_as.pw_gid)
        proc = self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                         "start", check=False)
        if proc.returncode != 0 and not self.status():
            tail = self.logfile.read_text(errors="replace").strip().splitlines()[-1:] if self.logfile.exists() else []
            raise CnnsqlError(f"private PostgreSQL did not start: {tail[0] if tail else proc.stderr.strip()}",
                              f"see {self.logfile}")
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._run(pg_bin("pg_isready"), "-q", "-h", str(self.socket_dir), "-p", str(self.port),
                         check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise CnnsqlError("private PostgreSQL started but does not accept connections", f"see {self.logfile}")

    def stop(self) -> bool:
        if not self.status():
            return False
        self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-m", "fast", "stop")
        return True

    def conninfo(self, dbname: str) -> dict:
        return {"host": str(self.socket_dir), "port": str(self.port), "user": SUPERUSER, "dbname": dbname}

    def tcp_conninfo(self, dbname: str) -> dict:
        """Loopback connection; the password comes from the pgpass file (set PGPASSFILE)."""
        return {"host": "127.0.0.1", "port": str(self.port), "user": SUPERUSER, "dbname": dbname}
