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
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from cnnsql.core import safefs
from cnnsql.core.errors import CnnsqlError

PG_BIN_CANDIDATES = ("/usr/lib/postgresql/15/bin",)
SUPERUSER = "cnnsql"
CLIENT_CHECK_MS = 1000
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "unix_socket_permissions": "0700",
    "wal_level": "minimal",          # lets COPY into a table truncated in the same transaction skip WAL
    "max_wal_senders": "0",
    "shared_buffers": "256MB",
    "max_wal_size": "2GB",
    "logging_collector": "off",
}

# Password authentication on the socket too: as root the server runs as `postgres` (or `nobody`), and any
# other process of that OS user (another cluster's PL/Python, say) must not be superuser of this one.
HBA = ("# socket: directory mode 0700, owner only; TCP: loopback only. Password (pgpass, 0600) on both; never trust.\n"
       "local all all scram-sha-256\nhost all all 127.0.0.1/32 scram-sha-256\n")


def _valid_port(text: str, where: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1024 <= port <= 65535:
        raise CnnsqlError(f"{where}: {text!r} is not a TCP port in 1024-65535", "give a free port number such as 54320")
    return port


def _port_free(port: int, reuse_addr: bool = False) -> bool:
    """Nobody listens on 127.0.0.1:port. reuse_addr: a port a stopped server left in TIME_WAIT counts as
    free (for a server that binds with SO_REUSEADDR itself, as PgBouncer does)."""
    with socket.socket() as s:
        if reuse_addr:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


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
        self.home = Path(home)
        self.root = self.home / "pg"
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
        env = self.server_env()
        proc = subprocess.run(self._cmd(*args), capture_output=True, text=True, env=env, cwd="/", input=input)
        if check and proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise CnnsqlError(
                f"{Path(args[0]).name} failed: {detail[-1] if detail else 'exit ' + str(proc.returncode)}",
                f"see {self.logfile}",
            )
        return proc

    def server_env(self) -> dict[str, str]:
        """The server's whole environment: a search path, the C locale and its user's home. Nothing of the
        caller's (tokens, passwords, DSNs) reaches it, nor PL/Python's os.environ in its backends."""
        home = self.run_as.pw_dir if self.run_as is not None else os.environ.get("HOME", "/")
        return {"PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C", "LANG": "C",
                "HOME": home, **({"TZ": os.environ["TZ"]} if os.environ.get("TZ") else {})}

    def _owner(self) -> tuple[int | None, int | None]:
        return (self.run_as.pw_uid, self.run_as.pw_gid) if self.run_as is not None else (None, None)

    def _own(self, path: Path, mode: int) -> None:
        """A folder of the server's user: created or taken (never through a link), mode and owner set."""
        safefs.private_dir(path, mode, *self._owner())

    def check_state(self) -> None:
        """The state folder and the cluster's folder must be the caller's alone (their parents owned by
        the caller or root, nobody else can write into them): secrets and the server's settings live there."""
        safefs.check_private_dir(self.home, "the state folder (CNNSQL_HOME)")
        safefs.check_private_dir(self.root, "the private cluster's folder")

    @property
    def exists(self) -> bool:
        """initdb has written a data directory (complete or not)."""
        return (self.data / "PG_VERSION").is_file()

    @property
    def initialized(self) -> bool:
        """Set-up finished: password, loopback-only TCP, pgpass. Written last, so never true half-way."""
        return self.exists and self.marker.is_file()

    @property
    def marker(self) -> Path:
        return self.root / "initialized"

    @property
    def port(self) -> int:
        try:
            return _valid_port(self.port_file.read_text().strip(), str(self.port_file))
        except OSError:
            raise CnnsqlError(f"the private cluster has no port file {self.port_file}",
                              "run `cnnsql db start`") from None

    def _choose_port(self) -> int:
        """CNNSQL_PG_PORT (validated, must be free), else the cluster's own port, else the first free one."""
        wanted = os.environ.get("CNNSQL_PG_PORT")
        if wanted:
            port = _valid_port(wanted, "CNNSQL_PG_PORT")
            if port != self._current_port() and not _port_free(port):
                raise CnnsqlError(f"CNNSQL_PG_PORT={port} is in use by another program",
                                  "choose a free port or unset CNNSQL_PG_PORT")
            return port
        current = self._current_port()
        if current:
            return current
        for port in range(54320, 54420):
            if _port_free(port):
                return port
        raise CnnsqlError("no free TCP port in 54320-54419 for the private cluster", "set CNNSQL_PG_PORT")

    def _current_port(self) -> int | None:
        try:
            return _valid_port(self.port_file.read_text().strip(), str(self.port_file))
        except (OSError, CnnsqlError):
            return None

    def _check_socket_path(self) -> None:
        if len(str(self.socket_dir / ".s.PGSQL.54320")) > 100:
            raise CnnsqlError(f"socket path under {self.socket_dir} is too long for a Unix socket",
                              "set CNNSQL_HOME to a shorter path")

    def _preflight(self) -> int:
        """Everything that can fail before initdb: binaries, paths, folders, the port."""
        for tool in ("initdb", "postgres", "pg_ctl"):
            pg_bin(tool)
        self._check_socket_path()
        self.check_state()
        safefs.private_dir(self.home, 0o711 if self.run_as else 0o700)
        safefs.private_dir(self.root, 0o755 if self.run_as else 0o700)
        self._own(self.data, 0o700)
        self._own(self.socket_dir, 0o700)
        if self.run_as is not None and self._run("test", "-w", str(self.data), check=False).returncode != 0:
            raise CnnsqlError(f"user {self.run_as.pw_name!r} cannot reach {self.data} (a parent directory is private)",
                              "set CNNSQL_HOME to a folder of yours whose parents the server's user can traverse "
                              "(mode 711 on each), not a shared temporary folder")
        return self._choose_port()

    def init(self) -> None:
        """Create the cluster, or repair one whose set-up was interrupted. TCP never has trust auth:
        initdb itself writes scram-sha-256 for host lines and sets the password (--pwfile)."""
        if self.initialized:
            return
        port = self._preflight()
        password = secrets.token_urlsafe(24)
        if self.exists:
            print(f"cnnsql: repairing the private cluster at {self.data}: its set-up is not marked complete",
                  file=sys.stderr)
            self._stop_half_made()
            self._write_hba()
            self._set_password(password)
        else:
            if any(self.data.iterdir()):  # an initdb killed before PG_VERSION: nothing in it yet
                shutil.rmtree(self.data)
                self._own(self.data, 0o700)
            self._initdb(password)
            self._write_hba()
        self._configure_port(port, password)
        safefs.write_private(self.marker, "set-up complete: scram-sha-256 on 127.0.0.1, password in pgpass\n", 0o644)

    def _initdb(self, password: str) -> None:
        pwfile = self.root / "initdb.pw"
        safefs.write_private(pwfile, password + "\n", 0o600, *self._owner())
        try:
            self._run(pg_bin("initdb"), "-D", str(self.data), "-U", SUPERUSER, "--auth-local=scram-sha-256",
                      "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)

    def _current_hba(self) -> None:
        """A cluster made by an earlier cnnsql trusted its socket: give it today's rules (reloaded if running)."""
        try:
            current = (self.data / "pg_hba.conf").read_text()
        except OSError:
            return
        if current != HBA:
            password = self._stored_password()
            self._write_pgpass(self.port, password)  # the socket's line first, then its rule
            self._write_hba()
            if self.status():
                self._run(pg_bin("pg_ctl"), "-D", str(self.data), "reload", check=False)

    def _write_hba(self) -> None:
        safefs.write_private(self.data / "pg_hba.conf", HBA, 0o600, *self._owner())

    def _set_password(self, password: str) -> None:
        proc = self._run(pg_bin("postgres"), "--single", "-D", str(self.data), "postgres", check=False,
                         input=f"ALTER ROLE {SUPERUSER} PASSWORD '{password}';\n")
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise CnnsqlError(f"the private cluster at {self.data} is half-made and cannot be repaired: "
                              f"{detail[-1] if detail else 'exit ' + str(proc.returncode)}",
                              f"delete {self.root} and run `cnnsql db start` again (its set-up never finished)")

    def _stop_half_made(self) -> None:
        self._clear_stale_pid()  # else pg_ctl would signal whatever process owns that PID now
        if self._run(pg_bin("pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0:
            self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-w", "-t", "60", "-m", "fast", "stop", check=False)

    def _configure_port(self, port: int, password: str | None = None) -> None:
        """Listen on 127.0.0.1:port (appended settings win over earlier ones); pgpass and port file follow."""
        conf = "\n".join(f"{k} = {v}" for k, v in SETTINGS.items())
        conf += f"\nunix_socket_directories = '{self.socket_dir}'\nport = {port}\n"
        with safefs.open_append(self.data / "postgresql.conf") as f:
            f.write("\n# cnnsql private cluster\n" + conf)
        password = password or self._stored_password()
        self._write_pgpass(port, password)
        safefs.write_private(self.port_file, str(port), 0o644)

    def _stored_password(self) -> str:
        return self.pgpass.read_text().splitlines()[0].rsplit(":", 1)[1]

    def _write_pgpass(self, port: int, password: str) -> None:
        """The password for TCP (127.0.0.1, localhost) and for the socket folder (libpq matches a socket
        outside the default folder by its path)."""
        socket_host = str(self.socket_dir).replace("\\", "\\\\").replace(":", "\\:")
        safefs.write_private(self.pgpass, "".join(f"{host}:{port}:*:{SUPERUSER}:{password}\n"
                                                  for host in ("127.0.0.1", "localhost", socket_host)), 0o600)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def _clear_stale_pid(self) -> None:
        """A postmaster.pid whose PID is now another program's: pg_ctl would call the cluster running."""
        pid = self._postmaster_pid()
        if pid is None:
            return
        try:
            proc = psutil.Process(pid)
            ours = proc.name() == "postgres" and str(self.data) in proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            ours = False
        if not ours:
            (self.data / "postmaster.pid").unlink(missing_ok=True)
            print(f"cnnsql: removed a stale postmaster.pid (PID {pid} is not this cluster's server)",
                  file=sys.stderr)

    def status(self) -> bool:
        if not self.exists:
            return False
        self._clear_stale_pid()
        return self._run(pg_bin("pg_ctl"), "-D", str(self.data), "status", check=False).returncode == 0

    def start(self) -> None:
        self.check_state()
        self.init()
        self._current_hba()
        if self.status():
            return
        wanted = os.environ.get("CNNSQL_PG_PORT")
        if wanted and _valid_port(wanted, "CNNSQL_PG_PORT") != self.port:
            self._configure_port(self._choose_port())
        self._own(self.socket_dir, 0o700)
        with safefs.open_append(self.logfile, 0o600, *self._owner()):  # the server appends; never through a link
            pass
        offset = self.logfile.stat().st_size
        # a backend whose client is gone (killed mid-query, or a pooler that dropped it) stops its query
        # within a second instead of computing it to the end (checked between a function's calls)
        proc = self._run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", "60",
                         "-o", f"-c client_connection_check_interval={CLIENT_CHECK_MS}", "start", check=False)
        if proc.returncode != 0 and not self.status():
            raise CnnsqlError(f"private PostgreSQL did not start: {self._log_cause(offset) or proc.stderr.strip()}",
                              self._start_hint(offset))
        self._wait_ready()

    def _new_log_lines(self, offset: int) -> list[str]:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                text = f.read(1 << 20).decode(errors="replace")
        except OSError:
            return []
        return [re.sub(r"^\S+ \S+ \S+ \[\d+\] ", "", l).strip() for l in text.splitlines() if l.strip()]

    def _log_cause(self, offset: int) -> str:
        """The server log line that names the cause, not the last one ('database system is shut down')."""
        lines = self._new_log_lines(offset)
        for key in ("could not bind", "FATAL", "PANIC", "ERROR"):
            for line in lines:
                if key in line:
                    return line
        return lines[-1] if lines else ""

    def _start_hint(self, offset: int) -> str:
        if any("could not bind" in l or "Address already in use" in l for l in self._new_log_lines(offset)):
            return f"port {self.port} is taken by another program: set CNNSQL_PG_PORT to a free port"
        return f"see {self.logfile}"

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
        return {"host": str(self.socket_dir), "port": str(self.port), "user": SUPERUSER, "dbname": dbname,
                "passfile": str(self.pgpass)}

    def tcp_conninfo(self, dbname: str) -> dict:
        """Loopback connection; the password comes from the pgpass file (set PGPASSFILE)."""
        return {"host": "127.0.0.1", "port": str(self.port), "user": SUPERUSER, "dbname": dbname}
