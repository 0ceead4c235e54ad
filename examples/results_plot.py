"""Read the benchmark results from PostgreSQL with pandas and draw a plot.

    python examples/results_plot.py [--out results/engines.png]
"""
import argparse
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from cnnsql import db  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="results/engines.png")
args = ap.parse_args()

with db.connection() as conn, warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # pandas prefers SQLAlchemy; psycopg2 works
    summary = pd.read_sql("SELECT engine, raw_images_per_s, sql_images_per_s, sql_over_raw, accuracy "
                          "FROM bench_engine_summary", conn)
print(summary.to_string(index=False))
ax = summary.set_index("engine")[["raw_images_per_s", "sql_images_per_s"]].astype(float).plot.bar(logy=True, rot=0)
ax.set_ylabel("images/s (log)")
ax.set_title("Median throughput per engine, raw and through EvaDB SQL")
plt.tight_layout()
from pathlib import Path  # noqa: E402

Path(args.out).parent.mkdir(parents=True, exist_ok=True)
plt.savefig(args.out, dpi=100)
print(f"plot written: {args.out}")
