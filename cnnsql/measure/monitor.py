"""Sample CPU, memory and (when there is one) GPU use while a benchmark phase runs."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time

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
