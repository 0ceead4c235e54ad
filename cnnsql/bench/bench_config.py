"""`cnnsql bench`'s settings and their defaults, defined once (the CLI reads them from here). Light:
importing it loads no framework and no EvaDB."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from cnnsql.data.datasets import DEFAULT as DEFAULT_DATASET
from cnnsql.engines import ENGINES, engine_class


@dataclass
class BenchConfig:
    """Every default of `cnnsql bench` (the CLI reads them from here)."""
    engines: list[str] = field(default_factory=lambda: list(ENGINES))
    weights: Path | None = None
    repetitions: int | None = None     # timed rounds per phase (default: the engine's bench_repetitions, else 3)
    warmup: int = 1
    threads: int = 2
    device: str = "cpu"
    limit: int | None = None            # test images for engines without a bench_sample (default: all)
    sample: int | None = None           # test images for engines with a bench_sample (default: theirs)
    full: bool = False                  # every engine on every test image
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16, 64, 256])
    sweep_images: int = 512             # images per batch-size point (or the engine's bench_sweep_images)
    single_stream: int = 100            # one-image calls for the latency scenario (or bench_single_stream)
    sql_single_stream: int = 5          # one-image SQL queries
    train_epochs: int = 1               # when no weights exist: a short default model (~3.5 min; 2 epochs
                                        # exceeded the 15-minute budget of a first `make bench-sql`)
    results_dir: Path | None = field(default_factory=lambda: default_results_dir())  # a JSON file per session
    progress: bool = True
    dataset: str | None = None          # cifar10 (default) or a `cnnsql load --images` dataset
    model: str | None = None            # built-in name, description .json or weights .npz (default: study)
    skip_unable: bool = False           # drop engines that cannot run the model (else: refuse)

    def weights_path(self, dataset: str) -> Path:
        """--weights; else a weights .npz given as --model; else default.npz for the study CNN on CIFAR-10;
        else <weights dir>/<dataset>-<model>.npz (what `cnnsql bench --dataset/--model` trains there)."""
        from cnnsql.core import config
        from cnnsql.models import model_spec

        if self.weights:
            return Path(self.weights).absolute()
        if self.model and self.model.endswith(".npz"):
            return Path(self.model).absolute()
        if self.model in (None, model_spec.DEFAULT_MODEL) and dataset in (None, DEFAULT_DATASET):
            return config.default_weights().absolute()
        stem = self.model if self.model in model_spec.BUILTINS else Path(self.model or model_spec.DEFAULT_MODEL).stem
        return (config.default_weights_dir() / f"{dataset}-{stem}.npz").absolute()

    def n_images(self, engine: str, available: int) -> int:
        """The first N test images: the engine's declared sample (a prefix, so shared by every engine)."""
        default = engine_class(engine).bench_sample
        if self.full:
            return available
        return min((self.limit or available) if default is None else (self.sample or default), available)

    def reps(self, engine: str | None = None, indb: bool = False) -> int:
        """Timed rounds per phase: --repetitions, else the engine's declared default (for the in-PostgreSQL
        phase its bench_indb_repetitions, if declared), else 3."""
        cls = engine_class(engine) if engine else None
        declared = cls and ((indb and cls.bench_indb_repetitions) or cls.bench_repetitions)
        return self.repetitions or declared or 3


def default_results_dir() -> Path:
    """Where each complete session's JSON file goes: $CNNSQL_RESULTS_DIR, else results/sessions (in the
    current folder: the repository for `make bench-sql`, where the files are committed)."""
    return Path(os.environ.get("CNNSQL_RESULTS_DIR") or "results/sessions")
