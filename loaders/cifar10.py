"""Load CIFAR-10 into PostgreSQL: the same command as `cnnsql load`, for scripts and cron jobs.

    python -m loaders.cifar10 [--source PATH | --synthetic N] [--no-download] [--quiet]
"""
from __future__ import annotations

import sys

from cnnsql.cli.main import main


def run(argv: list[str] | None = None) -> int:
    return main(["load", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run())
