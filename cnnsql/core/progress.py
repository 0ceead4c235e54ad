"""Progress bars: redrawn live on a terminal, one update every 30 s when stderr is a file or a pipe
(tqdm's default, ten redraws a second, put 1,400 updates of one training run into a CI log)."""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress_bar(**kwargs) -> tqdm:
    """A tqdm bar on stderr with the given arguments (total, unit, desc, disable, ...)."""
    if not sys.stderr.isatty():  # tqdm's monitor thread also redraws a bar silent for maxinterval
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(**kwargs)
