"""Run a benchmark query through EvaDB's Python API and print a table.

    python examples/query_evadb.py [--engine TorchCNN] [--limit 10]
"""
import argparse
import time

from cnnsql.placements import evadb_session

ap = argparse.ArgumentParser()
ap.add_argument("--engine", default="TorchCNN", choices=["TorchCNN", "TensorflowCNN", "VeloxCNN", "OnnxruntimeCNN", "Classify"])
ap.add_argument("--limit", type=int, default=10)
args = ap.parse_args()

cursor = evadb_session.connect()  # EvaDB cursor with `pg` and the functions registered
query = f"SELECT id, label, {args.engine}(img) FROM pg.cifar_test WHERE id < {int(args.limit)};"
t0 = time.perf_counter()
df = cursor.query(query).df(drop_alias=False)  # EvaDB's own Python API; keep table.column names
seconds = time.perf_counter() - t0
fn = args.engine.lower()
df = df.rename(columns={"cifar_test.id": "id", "cifar_test.label": "true_label", f"{fn}.label": "label",
                        f"{fn}.class_name": "class_name", f"{fn}.probability": "probability"})
print(df[["id", "true_label", "label", "class_name", "probability"]].to_string(index=False))
print(f"{len(df)} rows in {seconds:.2f} s; accuracy {(df.true_label == df.label).mean():.3f}")
