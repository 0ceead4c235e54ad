"""A process's own peak memory: VmHWM, the high-water mark of its resident set since its exec.

Not getrusage's ru_maxrss (nor os.wait4's): Linux keeps that figure across exec, and a process started
by fork (or vfork, as subprocess does) begins with its parent's resident set as its high-water mark.
Measured on the development VM: a child interpreter of a 313 MB parent reports ru_maxrss 313 MB and
VmHWM 13 MB. A study's child whose own peak is below the study process's size would report the study
process's size, which grows over a long study.

`python -m cnnsql.measure.peak -m MODULE ARGS...` runs MODULE as `python -m MODULE ARGS...` would and,
as it exits (whatever its exit code), prints `PREFIX <kB>` as the last line of its stderr; a parent
reads it back with `read_reported`.
"""
from __future__ import annotations

import runpy
import sys

PREFIX = "cnnsql-peak-kb"


def own_peak_kb() -> int | None:
    """This process image's peak resident set in kB (None where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), None)
    except (OSError, ValueError, IndexError):
        return None


def own_peak_mb() -> float | None:
    kb = own_peak_kb()
    return None if kb is None else kb / 1024


def read_reported(stderr: str) -> float | None:
    """The peak (MB) a `cnnsql.measure.peak` child reported on its stderr, or None."""
    for line in reversed(stderr.splitlines()):
        if line.startswith(PREFIX + " "):
            try:
                return int(line.split()[1]) / 1024
            except (ValueError, IndexError):
                return None
    return None


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] != "-m":
        raise SystemExit("usage: python -m cnnsql.measure.peak -m MODULE [ARGS...]")
    module = argv[1]
    sys.argv = [module, *argv[2:]]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.stdout.flush()
        print(PREFIX, own_peak_kb(), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
