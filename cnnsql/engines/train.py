"""Train a model (cnnsql.model_spec; the study's CNN by default) in PyTorch or TensorFlow and export it
to the framework-neutral layout.

The caller reads the data and writes the file (`save_weights`); this module only fits and checks.
After training, the exported arrays are loaded into the matching inference engine, which computes
the test accuracy, and its probabilities are compared with the live model's (`export_max_abs_diff`).
"""
from __future__ import annotations

import time

import numpy as np

from cnnsql.engines.base import check_images
from cnnsql.core.errors import CnnsqlError
from cnnsql.models.model_spec import STUDY, ModelSpec
from cnnsql.models.weights import Weights, validate_arrays

FRAMEWORKS = ("torch", "tensorflow")
# Adam at 1e-3, batch 64: on 2 cores this reached ~68% test accuracy on CIFAR-10 after
# DEFAULT_EPOCHS epochs (README "Training"); more epochs overfit (no augmentation, no dropout).
DEFAULT_EPOCHS = 8
DEFAULT_BATCH_SIZE = 64
DEFAULT_LR = 1e-3
EVAL_BATCH = 256


def train(framework: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, *,
          epochs: int | None = None, batch_size: int | None = None, seed: int = 0, device: str = "cpu",
          threads: int | None = None, progress: bool = True, lr: float = DEFAULT_LR,
          test_each_epoch: bool = False, spec: ModelSpec = STUDY) -> tuple[dict, dict]:
    """Fit, export, evaluate. Returns (arrays in the neutral layout, history).

    epochs/batch_size None: the defaults above. history["epochs"] holds one dict per epoch
    (epoch, seconds, loss, accuracy on the train set; test_accuracy too if `test_each_epoch`,
    which costs a few seconds per epoch).
    """
    if framework not in FRAMEWORKS:
        raise CnnsqlError(f"cannot train with {framework!r}", f"choose one of: {', '.join(FRAMEWORKS)}")
    x_train, y_train = check_data(x_train, y_train, "train", spec)
    x_test, y_test = check_data(x_test, y_test, "test", spec)
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if epochs < 1 or batch_size < 1:
        raise CnnsqlError(f"epochs ({epochs}) and batch size ({batch_size}) must be at least 1")
    fit = fit_torch if framework == "torch" else fit_tensorflow
    monitor = (lambda predict: accuracy(predict, x_test, y_test)) if test_each_epoch else None
    arrays, live_predict, epoch_list = fit(x_train, y_train, epochs=epochs, batch_size=batch_size, seed=seed,
                                          device=device, threads=threads, progress=progress, lr=lr, monitor=monitor,
                                          spec=spec)
    arrays = validate_arrays(arrays, f"exported from {framework}", spec)
    history = {
        "framework": framework, "model": spec.name, "batch_size": batch_size, "lr": lr, "optimizer": "adam", "seed": seed,
        "device": device, "threads": threads, "train_images": len(x_train), "test_images": len(x_test),
        "epochs": epoch_list, "train_seconds": float(sum(e["seconds"] for e in epoch_list)),
        **evaluate(framework, arrays, live_predict, x_test, y_test, device, threads, spec),
    }
    return arrays, history


def check_data(x: np.ndarray, y: np.ndarray, what: str, spec: ModelSpec = STUDY) -> tuple[np.ndarray, np.ndarray]:
    x = check_images(x, spec.input_shape)
    y = np.asarray(y).astype(np.int64).reshape(-1)
    if len(y) != len(x) or len(x) == 0:
        raise CnnsqlError(f"{what} set has {len(x)} images and {len(y)} labels")
    if y.min() < 0 or y.max() >= spec.num_classes:
        raise CnnsqlError(f"{what} labels must be 0..{spec.num_classes - 1}, got {y.min()}..{y.max()}",
                          f"model {spec.name!r} has {spec.num_classes} classes")
    return np.ascontiguousarray(x), y


def evaluate(framework, arrays, live_predict, x_test, y_test, device, threads, spec: ModelSpec = STUDY) -> dict:
    """Test accuracy from the engine running the exported weights; check it matches the live model."""
    from cnnsql.engines import get_engine

    weights = Weights(arrays, {"trained_by": framework, "model": spec.to_dict()})
    engine = get_engine(framework, weights, device=device, threads=threads)
    t0 = time.perf_counter()
    exported = engine.predict(x_test, batch_size=EVAL_BATCH)
    seconds = time.perf_counter() - t0
    live = predict_all(live_predict, x_test)
    return {
        "test_accuracy": float((exported.argmax(1) == y_test).mean()),
        "test_seconds": seconds,
        "export_max_abs_diff": float(np.abs(exported - live).max()),
        "export_argmax_agreement": float((exported.argmax(1) == live.argmax(1)).mean()),
    }


def predict_all(predict, x: np.ndarray) -> np.ndarray:
    return np.concatenate([predict(x[i:i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)])


def accuracy(predict, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_all(predict, x).argmax(1) == y).mean())


def batches(n: int, batch_size: int, rng: np.random.Generator):
    order = rng.permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def progress_bar(total: int, desc: str, enabled: bool):
    from cnnsql.core import progress

    return progress.progress_bar(total=total, desc=desc, unit="img", unit_scale=True, disable=not enabled, leave=True)


class EpochStats:
    """Running loss/accuracy over one epoch, shown on the progress bar."""

    def __init__(self, bar):
        self.bar, self.loss, self.correct, self.seen = bar, 0.0, 0, 0

    def update(self, loss: float, correct: int, n: int) -> None:
        self.loss += loss * n
        self.correct += correct
        self.seen += n
        self.bar.update(n)
        self.bar.set_postfix(loss=f"{self.loss / self.seen:.4f}", acc=f"{self.correct / self.seen:.4f}", refresh=False)


def run_epochs(step, n, *, epochs, batch_size, seed, progress, name, after_epoch=None) -> list[dict]:
    """Shared loop: `step(indices) -> (mean loss, correct count)` per batch; `after_epoch() -> test accuracy`."""
    rng = np.random.default_rng(seed)
    log = []
    for epoch in range(1, epochs + 1):
        with progress_bar(n, f"{name} epoch {epoch}/{epochs}", progress) as bar:
            stats = EpochStats(bar)
            t0 = time.perf_counter()
            for idx in batches(n, batch_size, rng):
                loss, correct = step(idx)
                stats.update(loss, correct, len(idx))
            seconds = time.perf_counter() - t0
        log.append({"epoch": epoch, "seconds": seconds, "loss": stats.loss / stats.seen,
                    "accuracy": stats.correct / stats.seen})
        if after_epoch:
            log[-1]["test_accuracy"] = after_epoch()
    return log


def fit_torch(x, y, *, epochs, batch_size, seed, device, threads, progress, lr, monitor=None, spec=STUDY):
    from cnnsql.engines.torch_engine import build_model, export_arrays, import_torch, torch_device

    torch = import_torch()
    dev = torch_device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    fmt = torch.channels_last
    model = build_model(spec).to(dev).to(memory_format=fmt)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    labels = torch.from_numpy(np.array(y))  # a copy: the fetched arrays are read-only

    def as_input(images: np.ndarray):
        t = torch.from_numpy(np.array(images)).to(dev)  # a copy of the batch: its rows are read-only
        return t.to(torch.float32).div_(255.0).contiguous(memory_format=fmt)

    def step(idx):
        model.train()   # dropout active, batch norm on batch statistics
        xb, yb = as_input(x[idx]), labels[idx].to(dev)
        logits = model(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item(), int((logits.argmax(1) == yb).sum())

    def live_predict(images):
        model.eval()
        with torch.inference_mode():
            return torch.softmax(model(as_input(images)), 1).cpu().numpy()

    after = (lambda: monitor(live_predict)) if monitor else None
    log = run_epochs(step, len(x), epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                     name="torch", after_epoch=after)
    return export_arrays(model, spec), live_predict, log


def fit_tensorflow(x, y, *, epochs, batch_size, seed, device, threads, progress, lr, monitor=None, spec=STUDY):
    from cnnsql.engines.tensorflow_engine import (
        build_model,
        export_arrays,
        import_tf,
        set_threads,
        tf_device,
        to_nhwc,
    )

    set_threads(threads)
    tf = import_tf()
    tf.keras.utils.set_random_seed(seed)
    dev = tf_device(device)
    with tf.device(dev):
        model = build_model(spec)
        opt = tf.keras.optimizers.Adam(learning_rate=lr)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    sig = [tf.TensorSpec([None, *spec.input_shape], tf.uint8), tf.TensorSpec([None], tf.int64)]

    @tf.function(input_signature=sig)
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            logits = model(to_nhwc(tf, xb), training=True)
            loss = loss_fn(yb, logits)
        opt.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        correct = tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, 1), yb), tf.int32))
        return loss, correct

    @tf.function(input_signature=sig[:1])
    def proba(xb):
        return tf.nn.softmax(model(to_nhwc(tf, xb), training=False))

    def step(idx):
        with tf.device(dev):
            loss, correct = train_step(x[idx], y[idx])
        return float(loss), int(correct)

    def live_predict(images):
        with tf.device(dev):
            return proba(np.ascontiguousarray(images)).numpy()

    after = (lambda: monitor(live_predict)) if monitor else None
    log = run_epochs(step, len(x), epochs=epochs, batch_size=batch_size, seed=seed, progress=progress,
                     name="tensorflow", after_epoch=after)
    return export_arrays(model, spec), live_predict, log
