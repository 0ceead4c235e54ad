"""Velox engine: the whole forward pass as one Velox plan (cnnsql/engines/velox_plan.py), run by
pyvelox's LocalRunner with `threads` drivers. CPU only (Velox has no GPU path).

NumPy converts at the boundary only (uint8 images in, probabilities out) and lays the weights out
once (reorders and the Winograd kernel transform); every operation on the data runs in Velox.
At construction the engine writes, into its own scratch folder, `TICKETS` DWRF files of one row
each (a slot number and the conv weights) and `FC1_BLOCKS` files of fc1 weight blocks; they are
the splits the drivers share. No file is written per call, none is ever rewritten, and the folder
is removed by `close()` (or when the engine is garbage-collected, or at exit).

If the DWRF writer cannot run in this process (pyvelox loaded after TensorFlow by other code: see
velox_runtime.py) the engine uses values nodes instead, which Velox runs on one driver: it logs a
warning and `describe()` records `source: values` and the reason, so a run's settings show it.
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from cnnsql.core.errors import CnnsqlError
from cnnsql.models.model_spec import STUDY
from cnnsql.models.weights import Weights
from cnnsql.engines import velox_layers as vl
from cnnsql.engines import velox_plan as vp
from cnnsql.engines import velox_runtime
from cnnsql.engines.base import Engine, check_images

log = logging.getLogger(__name__)

# One-row output batches: Velox's default (1,024 rows) would make each project node evaluate many
# images at once; measured in the prototype (../shared/research/velox) one row per batch was best.
QUERY_CONFIG = {"preferred_output_batch_rows": "1"}


def is_study(spec) -> bool:
    """The study's CNN on 3x32x32 images with 10 classes: the hand-tuned plan of velox_plan.py."""
    return spec.input_shape == STUDY.input_shape and spec.layers == STUDY.layers


def check_model(spec) -> None:
    """Every layer kind of the description has a generator (velox_layers.py); refuse anything else."""
    reason = VeloxEngine.cannot_run(spec)
    if reason:
        raise CnnsqlError(reason, "use --engine torch or tensorflow for this model")


class VeloxEngine(Engine):
    """`threads` = Velox drivers of the one plan (default: one per CPU core, as torch and TensorFlow)."""

    name = "velox"
    devices = ("cpu",)
    default_batch_size = 32      # images per plan (prototype, 2 drivers: 27.5-28.7 images/s with 8, 33.2 with 32)
    bench_sample = 1000          # `cnnsql bench`: test images by default (--full: all), ~65 s per pass
    bench_warmup_images = 64     # the warm-up compiles the plan: a whole 1,000-image pass is not needed
    bench_sweep_images = 32      # images per batch-size point of the sweep
    bench_single_stream = 10     # one-image calls of the single-stream phase
    bench_repetitions = 2        # timed passes per offline phase (raw and SQL, interleaved: a ratio with a range)
    bench_indb_repetitions = 1   # and in PostgreSQL: 5 x 1,000 images instead of 9 x 1,000 keep the default
                                 # `make bench-sql` inside 15 minutes from a clean clone (VELOX.md)
    TICKETS = 16                 # image splits: batch rows go to ticket rid % TICKETS
    FC1_BLOCKS = 8               # fc1 weight blocks of 64 neurons (the fc1 pipeline's splits)
    # Generated plans (models other than the study's): 3x3 conv + 2x2 max-pool as Winograd F(4,3)?
    # Off: on the VGG built-in (32 and 64 channels, 16-64 tiles per map) it ran at 0.55-0.78x the
    # direct form's images/s (4 interleaved pairs, 4 images, load 15; VELOX.md). The study's plan
    # keeps its own Winograd conv2 (64 x 64 channels, 49 tiles).
    WINOGRAD = False

    @classmethod
    def cannot_run(cls, spec) -> str | None:
        unknown = sorted({layer.kind for layer in spec.layers} - set(vl.GENERATED))
        if unknown:
            return (f"the Velox engine has no plan generator for layer kind(s) {', '.join(unknown)} "
                    f"of model {spec.name!r}")
        return None

    def __init__(self, weights: Weights, *, device: str = "cpu", threads: int | None = None):
        super().__init__(weights, device=device, threads=threads)
        check_model(self.spec)
        self._v = v = velox_runtime.load()
        self.plan_kind = "study" if is_study(self.spec) else "layers"
        if self.plan_kind == "study":
            self._arrays = arrays = vp.weight_arrays(weights)
            self._fc2 = v.va.to_velox(vp.fc2_batch(v.pa, arrays))
            tickets = [vp.ticket_batch(v.pa, arrays, slot) for slot in range(self.TICKETS)]
            blocks = vp.fc1_block_batches(v.pa, arrays, self.FC1_BLOCKS)
        else:   # any other model: one generated step per layer, all weights on the ticket row
            self._ops = vl.build_ops(self.spec, weights.arrays, self.WINOGRAD)
            tickets = [vl.ticket_batch(v.pa, self._ops, slot) for slot in range(self.TICKETS)]
            blocks = []
        self.fallback = velox_runtime.dwrf_writer_works()
        self._scratch = None
        if self.fallback is None:
            self.source = "table_scan"
            self._scratch = velox_runtime.ScratchFolder()
            self._ticket_schema = vp.schema_of(v.vt, tickets[0])
            self._block_schema = vp.schema_of(v.vt, blocks[0]) if blocks else None
            self._ticket_files = [velox_runtime.write_dwrf(b, self._scratch.new_path(f"ticket{i}"))
                                  for i, b in enumerate(tickets)]
            self._block_files = [velox_runtime.write_dwrf(b, self._scratch.new_path(f"fc1block{i}"))
                                 for i, b in enumerate(blocks)]
        else:
            self.source = "values"
            log.warning("Velox's DWRF writer fails in this process (%s): Velox runs on 1 driver from values "
                        "nodes. Import cnnsql's Velox engine before TensorFlow to avoid this.", self.fallback)
            self._tickets = [v.va.to_velox(tickets[0])]
            self._blocks = [v.va.to_velox(b) for b in blocks]

    @property
    def drivers(self) -> int:
        return (self.threads or os.cpu_count() or 1) if self.source == "table_scan" else 1

    def _inputs(self, images: np.ndarray) -> vp.PlanInputs:
        v, n = self._v, len(images)
        if self.source == "table_scan":
            slots = self.TICKETS
            files = self._ticket_files[:min(n, slots)]
            tickets = lambda pb: pb.table_scan(self._ticket_schema, input_files=files)  # noqa: E731
            blocks = lambda pb: pb.table_scan(self._block_schema, input_files=self._block_files)  # noqa: E731
        else:
            slots = 1
            tickets = lambda pb: pb.values(self._tickets)  # noqa: E731
            blocks = lambda pb: pb.values(self._blocks)  # noqa: E731
        rids = v.va.to_velox(v.pa.record_batch({"qid": v.pa.array(np.arange(n, dtype=np.int64))}))
        return vp.PlanInputs(tickets=tickets, images=v.va.to_velox(vp.image_batch(v.pa, images, slots)),
                             rids=rids, fc1_blocks=blocks, fc2=getattr(self, "_fc2", None), blocks=self.FC1_BLOCKS)

    def run_stage(self, images: np.ndarray, stage: str, width: int) -> np.ndarray:
        """The output column of `stage` (velox_plan.STAGES) per image, float32 (n, width)."""
        images = check_images(images, self.spec.input_shape)
        n = len(images)
        plan = vp.forward_plan(self._v.PlanBuilder, self._inputs(images), until=stage)
        drivers = max(1, min(self.drivers, n))
        with velox_runtime.execute(plan, drivers, QUERY_CONFIG) as result:
            return velox_runtime.rows_by_id(result.batches, vp.OUTPUT[stage], n, width)

    def _plan(self, images: np.ndarray):
        """The forward plan over `images` and the name of its output column."""
        if self.plan_kind == "study":
            return vp.forward_plan(self._v.PlanBuilder, self._inputs(images)), vp.OUTPUT["softmax"]
        inputs = self._inputs(images)
        return vl.forward_plan(self._v.PlanBuilder, self._ops, inputs.tickets, inputs.images), "a"

    def forward(self, images: np.ndarray) -> np.ndarray:
        plan, column = self._plan(images)
        with velox_runtime.execute(plan, max(1, min(self.drivers, len(images))), QUERY_CONFIG) as result:
            return velox_runtime.rows_by_id(result.batches, column, len(images), self.spec.num_classes)

    def profile(self, images: np.ndarray) -> dict[str, float]:
        """Velox's operator CPU time (ms) per stage of one forward pass over `images`."""
        plan, _ = self._plan(check_images(images, self.spec.input_shape))
        with velox_runtime.execute(plan, max(1, min(self.drivers, len(images))), QUERY_CONFIG) as result:
            text = result.runner.print_plan_with_stats()
        return stage_cpu_ms(text)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.remove()

    def describe(self) -> dict:
        import importlib.metadata

        return {**super().describe(), "pyvelox": importlib.metadata.version("pyvelox"), "drivers": self.drivers,
                "source": self.source, "fallback": self.fallback, "batch_size": self.default_batch_size,
                "plan": self.plan_kind,
                "device_note": "Velox runs on the CPU only"}


_CPU = re.compile(r"Cpu time: ([\d.]+)(us|ms|s)\b")


def stage_cpu_ms(stats_text: str) -> dict[str, float]:
    """Sum the 'Cpu time' of each plan node of print_plan_with_stats() into velox_plan stages: a
    project node by the first column it computes, a join or scan into the stage it feeds."""
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}
    totals: dict[str, float] = {}
    lines = stats_text.splitlines()
    for i, line in enumerate(lines):
        node = re.search(r"-- (\w+)\[[^\]]*\].*?-> (.*)$", line)
        if not node:
            continue
        kind, columns = node.group(1), [c.split(":")[0].strip() for c in node.group(2).split(", ")]
        cpu = 0.0
        for follow in lines[i + 1:i + 4]:  # the node's own stats lines, before the next node
            if "-- " in follow:
                break
            for value, unit in _CPU.findall(follow):
                cpu += float(value) * scale[unit]
        stage = _stage_of(kind, columns)
        totals[stage] = totals.get(stage, 0.0) + cpu
    return totals


def _stage_of(kind: str, columns: list[str]) -> str:
    if kind == "Project":
        computed = [c for c in columns if c in vp.STAGE_OF_COLUMN]
        return vp.STAGE_OF_COLUMN[computed[0]] if computed else "other"
    if kind == "TableScan" and "slot" in columns or kind == "HashJoin" and "img" in columns:
        return "source"
    if kind in ("TableScan", "HashJoin", "Aggregation") and ("wb" in columns or "y" in columns or "m" in columns):
        return "fc1"
    if kind == "HashJoin" and "w3" in columns:
        return "fc2"
    return "other"
