"""Velox engine: the whole forward pass as one Velox plan, run by pyvelox's LocalRunner.

CPU only (Velox has no GPU path). One row per image flows through project nodes whose Presto
lambdas do the work; NumPy only converts at the boundary (images in, probabilities out) and
lays out the weights once (reorders, no arithmetic on the data):

  table_scan over one DWRF file per image (rid, img: array<real> 3072, CHW), written by a Velox
  table_write plan: a scan with several splits lets `threads` drivers share the images. Fallback,
  single-driver: a values node with one vector per image (used when 1 driver is asked for, or when
  the DWRF writer fails: TensorFlow loaded first in the same process breaks its config parser)
  -> x  = transform(img, v -> v / 255)
  -> p1 = 900 conv1 patches of 27 values, gathered with element_at over sequence() indices
  -> c1 = per patch, zip_with over the 64 filters (a constant nested array literal):
          relu(array_sum(zip_with(patch, filter, *)) + bias)          -> 900 x 64 (HWC)
  -> p2 = 784 conv2 patches: flatten of the 9 neighbouring 64-channel vectors -> 784 x 576
  -> c2 = as c1 with the 64 x 576 conv2 filters                         -> 784 x 64
  -> h  = 2x2 max-pool (greatest of 4 channel vectors), flattened HWC   -> 12544
  -> hash join with the 512 fc1 rows (weights permuted to HWC order, a values node)
  -> a  = relu(dot(h, w_o) + b_o) per (image, o); aggregate map_agg(o, a) per image
  -> fc2 (constant literal), softmax.

Formulations tried and their cost are in benchmarks/VELOX.md.
"""
from __future__ import annotations

import functools
import logging
import tempfile

import numpy as np

from ..weights import Weights
from .base import Engine, check_images

R0 = "REAL '0.0'"
log = logging.getLogger(__name__)


def _lit_real(a: np.ndarray) -> str:
    """A Presto array literal (nested for 2-D) of REAL constants."""
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 1:
        return "ARRAY[" + ",".join(f"REAL '{float(v)!r}'" for v in a) + "]"
    return "ARRAY[" + ",".join(_lit_real(row) for row in a) + "]"


def _dense_relu(patches: str, filters: str, bias: str, out: str) -> str:
    return (f"transform({patches}, p -> zip_with({filters}, {bias}, (wk, b) -> "
            f"greatest(array_sum(zip_with(p, wk, (s, t) -> s * t)) + b, {R0}))) AS {out}")


# Index arithmetic uses sequence(): a lambda over a constant array literal that holds a nested
# lambda over another literal aborts pyvelox 0.2.0 when the runner is destroyed.
CONV_STAGES = [
    "transform(img, v -> v / REAL '255.0') AS x",
    # conv1 patch (c, dy, dx) of output q = (i, j) on the 30x30 grid, from the CHW image
    "transform(sequence(0, 899), q -> transform(sequence(0, 26), k -> element_at(x, "
    "(k / 9) * 1024 + (q / 30 + (k % 9) / 3) * 32 + q % 30 + k % 3 + 1))) AS p1",
    None,  # conv1 (weights)
    # conv2 patch: the 9 neighbouring channel vectors of c1, in (dy, dx, c) order
    "transform(sequence(0, 783), q -> flatten(transform(sequence(0, 8), k -> element_at(c1, "
    "(q / 28 + k / 3) * 30 + q % 28 + k % 3 + 1)))) AS p2",
    None,  # conv2 (weights)
    # 2x2 max-pool over the 28x28 grid, flattened in (row, column, channel) order
    "flatten(transform(sequence(0, 195), q -> zip_with("
    "zip_with(element_at(c2, (q / 14) * 56 + (q % 14) * 2 + 1), element_at(c2, (q / 14) * 56 + (q % 14) * 2 + 2), "
    "(a, b) -> greatest(a, b)), "
    "zip_with(element_at(c2, (q / 14) * 56 + 29 + (q % 14) * 2), element_at(c2, (q / 14) * 56 + 30 + (q % 14) * 2), "
    "(a, b) -> greatest(a, b)), (a, b) -> greatest(a, b)))) AS h",
]


@functools.cache
def _register_hive() -> None:
    """The table scan and writer need the Hive connector, registered once per process."""
    from pyvelox.runner import register_hive

    try:
        register_hive("hive")
    except RuntimeError as exc:  # registered by other code in this process
        if "already registered" not in str(exc):
            raise


def _write_dwrf(vector, path: str):
    """Write one Velox vector to a DWRF file with a table_write plan; returns the file handle."""
    from pyvelox import file as vf
    from pyvelox.plan_builder import PlanBuilder
    from pyvelox.runner import LocalRunner

    _register_hive()
    writer = LocalRunner(PlanBuilder().values([vector]).table_write(output_file=vf.DWRF(path)).get_plan_node())
    for _ in writer.execute(1):
        pass
    return vf.DWRF(path)


def prime_dwrf_writer() -> None:
    """Run the DWRF writer once. Its first use after TensorFlow has loaded fails ("Invalid capacity
    string"), while a writer used before TensorFlow keeps working: call this before loading it."""
    import pyarrow as pa
    import pyvelox.arrow as va

    with tempfile.TemporaryDirectory(prefix="cnnsql-velox-") as folder:
        _write_dwrf(va.to_velox(pa.record_batch({"x": pa.array([0], pa.int64())})), f"{folder}/prime.dwrf")


class VeloxEngine(Engine):
    """`threads` = Velox drivers of the one plan (default 1); the scan's splits are shared among them."""

    name = "velox"
    devices = ("cpu",)
    default_batch_size = 8

    def __init__(self, weights: Weights, *, device: str = "cpu", threads: int | None = None):
        super().__init__(weights, device=device, threads=threads)
        import pyarrow as pa
        import pyvelox.arrow as va

        self.source = "table_scan"  # becomes "values" if the DWRF writer cannot run in this process

        self._pa, self._va = pa, va
        w = weights
        stages = list(CONV_STAGES)
        stages[2] = _dense_relu("p1", _lit_real(w["conv1.weight"].reshape(64, 27)), _lit_real(w["conv1.bias"]), "c1")
        w2 = w["conv2.weight"].transpose(0, 2, 3, 1).reshape(64, 576)  # (out, dy, dx, c): patch order
        stages[4] = _dense_relu("p2", _lit_real(w2), _lit_real(w["conv2.bias"]), "c2")
        self._stages = stages
        self._fc2 = (f"zip_with({_lit_real(w['fc2.weight'])}, {_lit_real(w['fc2.bias'])}, "
                     "(wk, b) -> array_sum(zip_with(f1, wk, (s, t) -> s * t)) + b) AS lg")
        fc1 = w["fc1.weight"].reshape(512, 64, 14, 14).transpose(0, 2, 3, 1).reshape(512, 12544)  # HWC columns
        self._fc1 = va.to_velox(pa.record_batch({
            "wk": pa.array(np.zeros(512, np.int64)), "o": pa.array(np.arange(512, dtype=np.int32)),
            "fw": _list_array(pa, fc1), "fb": pa.array(w["fc1.bias"])}))

    def _plan(self, *, files=None, vectors=None):
        from pyvelox import type as vt
        from pyvelox.plan_builder import PlanBuilder

        if files is not None:
            schema = vt.ROW(["rid", "img"], [vt.BIGINT(), vt.ARRAY(vt.REAL())])
            pb = PlanBuilder().table_scan(schema, input_files=files)
        else:
            pb = PlanBuilder().values(vectors)
        for i, stage in enumerate(self._stages):
            pb = pb.project(["rid", stage] + (["0 AS k"] if i == len(self._stages) - 1 else []))
        build = pb.new_builder().values([self._fc1]).get_plan_node()
        return (pb.hash_join(["k"], ["wk"], build, ["rid", "o", "h", "fw", "fb"])
                .project(["rid", "o", f"greatest(array_sum(zip_with(h, fw, (s, t) -> s * t)) + fb, {R0}) AS a"])
                .aggregate(["rid"], ["map_agg(o, a) AS m"])
                .project(["rid", "transform(sequence(0, 511), i -> element_at(m, cast(i AS integer))) AS f1"])
                .project(["rid", self._fc2])
                .project(["rid", "transform(lg, v -> exp(v - array_max(lg))) AS e"])
                .project(["rid", "transform(e, v -> v / array_sum(e)) AS prob"])
                .get_plan_node())

    def _write_inputs(self, images: np.ndarray, folder: str) -> list:
        """One DWRF file per image (one row each keeps memory bounded), written by Velox itself."""
        return [_write_dwrf(vector, f"{folder}/img{i}.dwrf") for i, vector in enumerate(self._vectors(images))]

    def _vectors(self, images: np.ndarray) -> list:
        pa, va = self._pa, self._va
        flat = images.reshape(len(images), -1).astype(np.float32)
        return [va.to_velox(pa.record_batch({"rid": pa.array([i], pa.int64()), "img": _list_array(pa, flat[i:i + 1])}))
                for i in range(len(images))]

    def _execute(self, plan, drivers: int, out: np.ndarray) -> None:
        from pyvelox.runner import LocalRunner

        runner = LocalRunner(plan)
        batches = [self._va.to_arrow(b) for b in runner.execute(drivers)]
        for batch in batches:
            out[batch.field("rid").to_numpy()] = np.asarray(batch.field("prob").flatten().to_numpy(),
                                                            np.float64).reshape(-1, 10)
        del batches, batch  # the Arrow arrays point into the runner's memory: drop them first
        del runner

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        n = len(images)
        out = np.empty((n, 10), dtype=np.float32)
        if n == 0:
            return out
        drivers = max(1, min(self.threads or 1, n))
        if drivers > 1 and self.source == "table_scan":
            with tempfile.TemporaryDirectory(prefix="cnnsql-velox-") as folder:
                try:
                    files = self._write_inputs(images, folder)
                except RuntimeError as exc:
                    if "Invalid capacity string" not in str(exc):
                        raise
                    self.source = "values"
                    log.warning("Velox's DWRF writer fails in this process (TensorFlow was loaded first and breaks "
                                "its config parser): Velox falls back to a values source with 1 driver")
                else:
                    self._execute(self._plan(files=files), drivers, out)
                    return out
        self._execute(self._plan(vectors=self._vectors(images)), 1, out)
        return out

    def describe(self) -> dict:
        import importlib.metadata

        return {**super().describe(), "pyvelox": importlib.metadata.version("pyvelox"),
                "drivers": self.threads or 1, "source": self.source, "device_note": "Velox runs on the CPU only"}


def _list_array(pa, mat: np.ndarray):
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    n, length = mat.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * length), pa.array(mat.ravel()))
