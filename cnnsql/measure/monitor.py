"""Sample CPU, memory and (when there is one) GPU use while a benchmark phase runs (ResourceMonitor), and
the memory of a PostgreSQL server's processes while a study's phase runs (ServerSampler)."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

import psutil


class ResourceMonitor:
    """Context manager. CPU% is for this process and its children (100% = one core busy);
    peak RSS is the largest sampled sum; GPU% is nvidia-smi's utilization.gpu averaged."""

    def __init__(self, interval: float = 0.1, pid: int | None = None):
        self.interval = interval
        self.cpu: list[float] = []
        self.rss: list[float] = []
        self.gpu: list[float] = []
        self._stop = threading.Event()
        self._proc = psutil.Process(pid)  # pid: another process to watch (a PostgreSQL backend)
        self._smi = None

    def _tree(self):
        procs = [self._proc]
        try:
            procs += self._proc.children(recursive=True)
        except psutil.Error:
            pass
        return procs

    def _sample(self):
        known: dict[int, psutil.Process] = {}
        while not self._stop.wait(self.interval):
            cpu = rss = 0.0
            for p in self._tree():
                p = known.setdefault(p.pid, p)
                try:
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
                except psutil.Error:
                    continue
            self.cpu.append(cpu)
            self.rss.append(rss / 2**20)

    def _read_gpu(self):
        for line in self._smi.stdout:
            try:
                self.gpu.append(float(line.split(",")[0]))
            except ValueError:
                continue

    def __enter__(self):
        """Re-enterable: samples of every entry accumulate (a phase's interleaved calls)."""
        self._stop = threading.Event()
        for p in self._tree():
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        self.rss.append(self._proc.memory_info().rss / 2**20)
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={int(self.interval * 1000)}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            threading.Thread(target=self._read_gpu, daemon=True).start()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._start = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        if self._smi:
            self._smi.terminate()
            self._smi.wait()
        return False

    def summary(self) -> dict:
        return {
            "cpu_pct": sum(self.cpu) / len(self.cpu) if self.cpu else None,
            "peak_rss_mb": max(self.rss) if self.rss else None,
            "gpu_pct": sum(self.gpu) / len(self.gpu) if self.gpu else None,
        }


def server_children(postmaster: int | None) -> list[int] | None:
    """The pids of the server's processes (the postmaster's children), or None when it cannot be read."""
    if not postmaster:
        return None
    try:
        return [int(pid) for pid in Path(f"/proc/{postmaster}/task/{postmaster}/children").read_text().split()]
    except (OSError, ValueError):
        return None


def server_processes(postmaster: int | None) -> set[int]:
    return set(server_children(postmaster) or ())


def settle(postmaster: int | None, baseline: set[int], timeout: float = 30.0) -> float:
    """Wait until the server processes a previous measurement started have exited (a backend that ran a
    framework takes a moment to end), so that the next one's server figures are its own. Seconds waited."""
    t0 = time.monotonic()
    while server_processes(postmaster) - baseline and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return time.monotonic() - t0


class ServerSampler:
    """Context manager: peak VmRSS and RssAnon of one PostgreSQL server process, and peak sum of RssAnon
    over all of them (a backend's RSS includes the shared buffers it touched, RssAnon does not), read
    from /proc every `interval` s. `postmaster`: the server's pid (None: a server elsewhere, no figures)."""

    def __init__(self, postmaster: int | None, interval: float = 0.2):
        self.postmaster, self.interval = postmaster, interval
        self.peak_rss = self.peak_anon = self.peak_anon_sum = 0.0
        self.peak_anon_process = ""
        self._stop = threading.Event()

    def _pids(self) -> list[int]:
        children = server_children(self.postmaster)
        return [] if children is None else [self.postmaster, *children]

    @staticmethod
    def _title(pid: int) -> str:
        """The server process's title: 'postgres: autovacuum worker', 'postgres: cnnsql cnnsql 127.0.0.1 ...'."""
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:60].strip()
        except OSError:
            return "?"

    @staticmethod
    def _status(pid: int) -> dict:
        out = {}
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    out[key] = int(value.split()[0]) / 1024
        except OSError:
            pass
        return out

    def _run(self):
        while True:
            anon_sum = 0.0
            for pid in self._pids():
                s = self._status(pid)
                self.peak_rss = max(self.peak_rss, s.get("VmRSS", 0))
                if s.get("RssAnon", 0) > self.peak_anon:
                    self.peak_anon, self.peak_anon_process = s["RssAnon"], self._title(pid)
                anon_sum += s.get("RssAnon", 0)
            self.peak_anon_sum = max(self.peak_anon_sum, anon_sum)
            if self._stop.wait(self.interval):
                return

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        return False

    def summary(self) -> dict:
        return {"server_peak_rss_mb": self.peak_rss, "server_peak_anon_mb": self.peak_anon,
                "server_peak_anon_sum_mb": self.peak_anon_sum, "server_peak_anon_process": self.peak_anon_process}
