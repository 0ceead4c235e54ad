"""Bring your own CNN through ONNX: export it from PyTorch (torch.onnx.export) or Keras (tf2onnx), convert
it with `cnnsql import --onnx`, and check that every engine gives the exporter's own answers.

    python examples/import_onnx.py [--from torch|keras] [--dir DIR] [--engines torch,onnxruntime,...]

The model is small and has random weights (a residual block, a depthwise convolution, ReLU6, batch norm,
global average pooling, a dense classifier); no database is needed. Exits 1 if an engine disagrees.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

SHAPE = (3, 32, 32)   # channels, height, width: what cnnsql stores (uint8, scaled by 1/255 by every engine)
CLASSES = "airplane,automobile,bird,cat,deer,dog,frog,horse,ship,truck"


def from_torch(path: Path):
    """A PyTorch model exported with torch.onnx.export -> its answer on uint8 images."""
    import torch
    from torch import nn

    class Block(nn.Module):   # a residual block: conv-bn-relu, conv-bn, plus its input, relu
        def __init__(self, c):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
            self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

        def forward(self, x):
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), Block(16), nn.MaxPool2d(2),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),   # depthwise
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    for bn in (model[2].b1, model[2].b2):   # batch-norm statistics as training would leave them
        bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    warnings.filterwarnings("ignore", category=DeprecationWarning)   # dynamo=False: the TorchScript exporter
    torch.onnx.export(model, (torch.rand(1, *SHAPE),), str(path), dynamo=False,
                      input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})

    def answer(images):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(images).float() / 255), 1).numpy()
    return answer


def from_keras(path: Path):
    """A Keras functional model (channels_last) converted by tf2onnx -> its answer on uint8 images."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    import tf2onnx

    L = tf.keras.layers
    tf.keras.utils.set_random_seed(0)
    inp = tf.keras.Input((SHAPE[1], SHAPE[2], SHAPE[0]))
    y = L.Conv2D(16, 3, padding="same", activation="relu")(inp)
    z = L.BatchNormalization()(L.Conv2D(16, 3, padding="same")(y))
    y = L.ReLU()(L.Add()([y, z]))                                 # residual
    y = L.DepthwiseConv2D(3, padding="same")(L.MaxPooling2D(2)(y))
    y = L.GlobalAveragePooling2D()(L.ReLU(max_value=6.0)(y))      # ReLU6
    model = tf.keras.Model(inp, L.Dense(10, activation="softmax")(y))
    bn = next(layer for layer in model.layers if isinstance(layer, L.BatchNormalization))
    rng = np.random.default_rng(0)
    bn.set_weights([rng.uniform(0.5, 1.5, 16), rng.uniform(-0.2, 0.2, 16), rng.uniform(-0.5, 0.5, 16),
                    rng.uniform(0.5, 1.5, 16)])
    sig = (tf.TensorSpec((None, SHAPE[1], SHAPE[2], SHAPE[0]), tf.float32, name="x"),)
    tf2onnx.convert.from_keras(model, input_signature=sig, opset=13, output_path=str(path))

    def answer(images):   # Keras takes NHWC; cnnsql's images are NCHW
        return model(np.transpose(images, (0, 2, 3, 1)).astype(np.float32) / 255, training=False).numpy()
    return answer


def main() -> int:
    ap = argparse.ArgumentParser(description="Export a small CNN to ONNX, cnnsql import --onnx it, compare every engine.")
    ap.add_argument("--from", dest="source", choices=["torch", "keras"], default="torch")
    ap.add_argument("--dir", type=Path, help="where to write model.onnx and model.npz (default: a temporary folder)")
    ap.add_argument("--engines", default="torch,tensorflow,velox,onnxruntime")
    ap.add_argument("--images", type=int, default=8, help="random images to compare on")
    args = ap.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="cnnsql-onnx-"))
    folder.mkdir(parents=True, exist_ok=True)
    onnx_file, weights_file = folder / "model.onnx", folder / "model.npz"

    answer = (from_torch if args.source == "torch" else from_keras)(onnx_file)
    print(f"exported {onnx_file} ({onnx_file.stat().st_size:,} bytes)")
    command = [sys.executable, "-m", "cnnsql", "import", "--onnx", str(onnx_file), "--out", str(weights_file),
               "--classes", CLASSES]
    print("$ cnnsql " + " ".join(command[3:]))
    proc = subprocess.run(command, capture_output=True, text=True)
    print(proc.stdout + proc.stderr, end="")
    if proc.returncode:
        return 1

    from cnnsql.engines import get_engine
    from cnnsql.models.weights import load_weights

    weights = load_weights(weights_file)
    images = np.random.default_rng(1).integers(0, 256, (args.images, *SHAPE), dtype=np.uint8)
    want = answer(images)
    agree = True
    for name in args.engines.split(","):
        engine = get_engine(name, weights, threads=1)
        try:
            got = engine.predict(images)
        finally:
            getattr(engine, "close", lambda: None)()
        same = int((got.argmax(1) == want.argmax(1)).sum())
        diff = float(np.abs(got - want).max())
        agree &= same == len(images) and diff < 1e-4
        print(f"{name:>12}: top-1 {same}/{len(images)} as {args.source}, largest probability difference {diff:.1e}")
    print(f"every engine gives {args.source}'s answers" if agree else "ENGINES DISAGREE")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
