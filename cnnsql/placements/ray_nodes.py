"""A real multi-node Ray cluster on one machine, for trying `--cluster ray --address` without a second host:
`ray start --head` and `ray start --address` nodes, every one on 127.0.0.1 with token authentication, no
dashboard, each with its own 0700 temp folder.

`ray start` replaces a node IP of 127.0.0.1 by the host's address (and then listens on every interface),
and so does a driver's `ray.init(address="127.0.0.1:P")`, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which
in turn makes `ray start` refuse any node but the head. So the nodes' and drivers' environment (`env`) sets
it to 0, and each node is started by `ray start` run through `python -c` with the node check allowed and the
substitution turned off: measured, the GCS and both raylets then listen on 127.0.0.1 only (plain CLI: `::`),
and a driver given `--address 127.0.0.1:P` reaches them (with the default it dials the host's address). Nodes are stopped by the pids
of the processes that name their temp folder (`ray stop` would stop every Ray of the machine).
"""
from __future__ import annotations

import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

from cnnsql.core.errors import CnnsqlError

RAY_START = ("import sys; from ray._private import ray_constants, services; ray_constants.ENABLE_RAY_CLUSTER = True; "
             "services.resolve_ip_for_localhost = lambda h: h; "
             "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; main()")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackCluster:
    """Head plus `len(cpus) - 1` nodes; `env` is what the nodes (and so the workers) and drivers get."""

    def __init__(self, env: dict, cpus: tuple[int, ...] = (2, 2)):
        token = secrets.token_hex(32)
        self.env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        self.cpus = cpus
        self.dirs = [Path(tempfile.mkdtemp(prefix=f"cnnsql-ray{i}-")) for i in range(len(cpus))]  # 0700
        self.address = f"127.0.0.1:{free_port()}"

    def _ray_start(self, i: int, *args: str) -> None:
        cmd = [sys.executable, "-c", RAY_START, "start", "--node-ip-address=127.0.0.1", f"--num-cpus={self.cpus[i]}",
               "--disable-usage-stats", f"--temp-dir={self.dirs[i]}", *args]
        proc = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise CnnsqlError(f"`ray start` of node {i} failed: {tail[0][:300]}", "see the temp folder's logs")

    def start(self) -> "LoopbackCluster":
        self._ray_start(0, "--head", f"--port={self.address.split(':')[1]}", "--include-dashboard=false")
        for i in range(1, len(self.cpus)):
            self._ray_start(i, f"--address={self.address}")
        return self

    def processes(self, i: int) -> list[psutil.Process]:
        folder = str(self.dirs[i])
        return [p for p in psutil.process_iter(["cmdline"]) if any(folder in c for c in (p.info["cmdline"] or []))]

    def kill(self, i: int) -> list[int]:
        """SIGKILL every process of node i (its raylet, agents and workers): the node dies at once."""
        procs = self.processes(i)
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        return [p.pid for p in procs]

    def listeners(self) -> list[tuple[int, str, str]]:
        """(node, process name, address) of every listening TCP socket of the nodes' processes."""
        out = []
        for i in range(len(self.dirs)):
            for p in self.processes(i):
                try:
                    out += [(i, p.name(), c.laddr.ip) for c in p.net_connections("tcp") if c.status == "LISTEN"]
                except psutil.Error:
                    continue
        return out

    def stop(self) -> None:
        for i in reversed(range(len(self.dirs))):
            self.kill(i)
            shutil.rmtree(self.dirs[i], ignore_errors=True)
