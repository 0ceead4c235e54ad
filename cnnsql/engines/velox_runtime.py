"""pyvelox 0.2.0 plumbing: loading it safely, writing DWRF splits, running a plan, reading results.

Import order. TensorFlow loads `libtensorflow_framework.so.2` with RTLD_GLOBAL, and that library
exports its own RE2 (593 symbols). When pyvelox's `libvelox.so` is loaded after it, the dynamic
linker binds part of libvelox's RE2 references (the `RE2::RE2` constructors, `~RE2`,
`NamedCapturingGroups`; seen with LD_DEBUG=bindings) to TensorFlow's copy while the rest stays on
the RE2 bundled in `pyvelox.libs`: two RE2 versions mixed on one object. Velox parses the Hive
writer's "64MB" capacity settings with an RE2 pattern, so the DWRF writer failed with "Invalid
capacity string '64MB'" (the locale was not involved: it is "C" in both orders). `load()` opens
`libvelox.so` with RTLD_DEEPBIND before pyvelox imports it, so libvelox resolves its symbols in its
own dependencies first, whatever was loaded before. When libvelox was already loaded (by other code,
after TensorFlow) the flag cannot be applied any more: `dwrf_writer_works()` then says so.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
import uuid
import weakref
from types import SimpleNamespace

import numpy as np

from cnnsql.core.errors import CnnsqlError


@functools.cache
def load() -> SimpleNamespace:
    """pyvelox's modules (and pyarrow), with libvelox.so opened RTLD_DEEPBIND first (see above)."""
    if "pyvelox.runner" not in sys.modules:
        spec = importlib.util.find_spec("pyvelox")
        lib = os.path.join(os.path.dirname(spec.origin), "libvelox.so") if spec and spec.origin else ""
        if os.path.exists(lib):
            ctypes.CDLL(lib, mode=os.RTLD_NOW | os.RTLD_DEEPBIND)
    import pyarrow as pa
    import pyvelox.arrow as va
    from pyvelox import file as vf
    from pyvelox import type as vt
    from pyvelox.plan_builder import PlanBuilder
    from pyvelox.runner import LocalRunner, register_hive

    try:
        register_hive("hive")  # the table scan and writer need the Hive connector, once per process
    except RuntimeError as exc:  # registered by other code in this process
        if "already registered" not in str(exc):
            raise
    return SimpleNamespace(pa=pa, va=va, vf=vf, vt=vt, PlanBuilder=PlanBuilder, LocalRunner=LocalRunner)


def write_dwrf(batch, path: str):
    """Write an Arrow record batch to a new DWRF file with a Velox table_write plan; returns the file.
    Never call it twice with one path: Velox's Hive connector caches file handles by path."""
    v = load()
    if os.path.exists(path):
        raise FileExistsError(path)
    writer = v.LocalRunner(v.PlanBuilder().values([v.va.to_velox(batch)]).table_write(output_file=v.vf.DWRF(path))
                           .get_plan_node())
    for _ in writer.execute(1):
        pass
    del writer
    return v.vf.DWRF(path)


class ScratchFolder:
    """One private folder per engine for its DWRF files, with a unique name (file handles are cached
    by path), removed when the engine is closed or garbage-collected, or at interpreter exit. A
    process that never reaches exit handlers (killed; a PostgreSQL backend) leaves its folder: each
    new one first removes this user's folders whose process (the pid in the name) is gone."""

    def __init__(self, prefix: str = "cnnsql-velox-"):
        remove_orphans(prefix)
        self.path = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}-")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.path, True)
        self._count = 0

    def new_path(self, stem: str) -> str:
        self._count += 1
        return os.path.join(self.path, f"{stem}-{self._count}.dwrf")

    def remove(self) -> None:
        self._cleanup()


def remove_orphans(prefix: str) -> list[str]:
    """Remove `prefix<pid>-*` folders in the temp directory owned by this user whose pid is not running."""
    removed = []
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        pid = name[len(prefix):].split("-", 1)[0]
        path = os.path.join(root, name)
        if not name.startswith(prefix) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            if os.lstat(path).st_uid != os.getuid() or not os.path.isdir(path):
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        except OSError:  # alive under another user, or vanished meanwhile
            continue
    return removed


@functools.cache
def dwrf_writer_works() -> str | None:
    """None if the DWRF writer works in this process, else the reason (one line)."""
    v = load()
    folder = ScratchFolder("cnnsql-velox-probe-")
    try:
        write_dwrf(v.pa.record_batch({"x": v.pa.array([0], v.pa.int64())}), folder.new_path("probe"))
    except RuntimeError as exc:
        lines = [line for line in str(exc).splitlines() if line.startswith("Reason:")]
        return (lines[0] if lines else str(exc).splitlines()[0])[:200]
    finally:
        folder.remove()
    return None


@contextlib.contextmanager
def execute(plan, drivers: int, configs: dict[str, str]):
    """Run `plan`; yields the output as Arrow struct arrays. They point into the runner's memory:
    use them inside the block only (the runner is destroyed after them when the block ends)."""
    v = load()
    runner = v.LocalRunner(plan)
    for key, value in configs.items():
        runner.add_query_config(key, value)
    batches = [v.va.to_arrow(b) for b in runner.execute(drivers)]
    holder = SimpleNamespace(batches=batches, runner=runner)
    try:
        yield holder
    finally:
        holder.batches.clear()
        del batches
        holder.runner = None
        del runner


def rows_by_id(batches, column: str, n: int, width: int) -> np.ndarray:
    """Copy column `column` (fixed `width` REAL values per row, nested lists flattened) of the rows
    with rid 0..n-1 into a float32 (n, width) array, checking that every id came exactly once."""
    out = np.zeros((n, width), dtype=np.float32)
    seen = np.zeros(n, dtype=np.int64)
    for batch in batches:
        if len(batch) == 0:
            continue
        rid = np.asarray(batch.field("rid").to_numpy(zero_copy_only=False))
        col = batch.field(column)
        while load().pa.types.is_list(col.type):
            col = col.flatten()
        out[rid] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(rid), width)
        np.add.at(seen, rid, 1)
    if not (seen == 1).all():
        raise CnnsqlError(f"Velox returned {int(seen.sum())} rows for {n} images (ids missing or repeated)",
                          "no result is given; rerun with --debug and report it, or use another engine")
    return out
