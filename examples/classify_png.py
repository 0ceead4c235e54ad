"""Classify your own picture: insert it into PostgreSQL, then query it through SQL.

    python examples/classify_png.py picture.png [--engine TorchCNN]
"""
import argparse

from cnnsql import db
from cnnsql.placements import evadb_session
from cnnsql.data.images import insert_image

ap = argparse.ArgumentParser()
ap.add_argument("image")
ap.add_argument("--engine", default="TorchCNN", choices=["TorchCNN", "TensorflowCNN", "VeloxCNN", "OnnxruntimeCNN"])
args = ap.parse_args()

with db.connection() as conn:
    db.ensure_schema(conn)
    image_id = insert_image(conn, args.image)  # resized to 32x32 RGB, stored like CIFAR-10
cursor = evadb_session.connect()
df = cursor.query(f"SELECT id, name, {args.engine}(img) FROM pg.user_images WHERE id = {int(image_id)};").df()
row = df.iloc[0]
print(f"{row['name']}: {row['class_name']} (p={row['probability']:.3f}, image id {image_id})")
