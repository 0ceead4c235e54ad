"""`cnnsql import`: an ONNX model (cnnsql/engines/onnx_import.py), a PyTorch nn.Sequential or a Keras
Sequential model -> a cnnsql weights file.

PyTorch: the state dict (`torch.save(model.state_dict(), F)`, read with weights_only=True: no code is
unpickled) and the module list as `print(model)` writes it, e.g.
    Sequential(
      (0): Conv2d(3, 6, kernel_size=(5, 5), stride=(1, 1))
      (1): ReLU()
      ...
Keras: a `.keras` file of a Sequential model (loaded with safe_mode=True), channels_last.

Supported layers: the model description's (Conv2d/Conv2D, ReLU, MaxPool2d/MaxPooling2D,
AvgPool2d/AveragePooling2D, BatchNorm1d/2d/BatchNormalization, Flatten, Linear/Dense, Dropout,
Softmax, Keras activations relu/softmax/linear). Any other layer or option is one clear error naming
it. A trailing softmax is added when the model ends in logits. Files are size-checked before reading.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np

from cnnsql.models import model_spec as M
from cnnsql.core.errors import CnnsqlError
from cnnsql.models.weights import MAX_WEIGHTS_BYTES, save_weights

MAX_MODULES_BYTES = 1 << 20
LINE = re.compile(r"^\s*\((\w+)\):\s*(\w+)\((.*)\)\s*$")


def _unsupported(what: str, source: str) -> CnnsqlError:
    return CnnsqlError(f"{source}: unsupported layer {what}",
                       "cnnsql models use conv2d (grouped, depthwise), relu, relu6, max/avg pool, global average pool, "
                       "batch norm, add, concat, flatten, dense, dropout, softmax; ONNX graphs: cnnsql import --onnx "
                       "(docs/models-and-data.md, 'Model description')")


def _size_check(path: Path, limit: int) -> None:
    if not path.is_file():
        raise CnnsqlError(f"{path} not found", "give an existing file")
    if path.stat().st_size > limit:
        raise CnnsqlError(f"{path} is {path.stat().st_size:,} bytes, more than {limit:,}", "is it the right file?")


def _args(text: str) -> tuple[list, dict]:
    """Positional and keyword arguments of a module repr, e.g. '3, 6, kernel_size=(5, 5)'."""
    call = ast.parse(f"f({text})", mode="eval").body
    value = lambda node: ast.literal_eval(node) if not isinstance(node, ast.Name) else node.id  # noqa: E731
    return [value(a) for a in call.args], {k.arg: value(k.value) for k in call.keywords}


def _square(v, what: str, source: str) -> int:
    if isinstance(v, (tuple, list)):
        if len(set(v)) != 1:
            raise _unsupported(f"{what} {tuple(v)} (not square)", source)
        v = v[0]
    return int(v)


def torch_layers(modules_text: str, source: str) -> list[tuple[str, M.Layer]]:
    """(state-dict prefix, layer) per module, in order; prefix '' for layers without parameters."""
    out = []
    for line in modules_text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        key, kind, argtext = m.groups()
        try:
            args, kw = _args(argtext)
        except (SyntaxError, ValueError):
            raise CnnsqlError(f"{source}: cannot read module ({key}): {line.strip()[:120]}",
                              "give the text `print(model)` writes") from None
        out.extend(_torch_layer(key, kind, args, kw, source))
    if not out:
        raise CnnsqlError(f"{source}: no modules found", "give the text `print(model)` writes for an nn.Sequential")
    return out


def _torch_layer(key, kind, args, kw, source):
    where = f"({key}) {kind}"
    if kind == "Conv2d":
        k = _square(kw.get("kernel_size", args[2] if len(args) > 2 else None), "kernel", source)
        s = _square(kw.get("stride", 1), "stride", source)
        pad = kw.get("padding", 0)
        if _square(kw.get("dilation", 1), "dilation", source) != 1 or kw.get("groups", 1) != 1:
            raise _unsupported(f"{where} with dilation or groups", source)
        if kw.get("padding_mode", "zeros") != "zeros":
            raise _unsupported(f"{where} padding_mode {kw['padding_mode']}", source)
        if pad in ("valid", "same"):
            padding = pad
        else:
            p = _square(pad, "padding", source)
            if p == 0:
                padding = "valid"
            elif s == 1 and k % 2 == 1 and p == (k - 1) // 2:
                padding = "same"
            else:
                raise _unsupported(f"{where} padding {p} with kernel {k} stride {s} (neither valid nor same)", source)
        return [(key, M.conv2d(f"conv{key}", int(args[1] if len(args) > 1 else kw["out_channels"]), k, s, padding))]
    if kind in ("MaxPool2d", "AvgPool2d"):
        k = _square(kw.get("kernel_size", args[0] if args else None), "kernel", source)
        s = _square(kw.get("stride", args[1] if len(args) > 1 else k) or k, "stride", source)
        if _square(kw.get("padding", 0), "padding", source) != 0 or kw.get("ceil_mode") or \
                _square(kw.get("dilation", 1), "dilation", source) != 1:
            raise _unsupported(f"{where} with padding, dilation or ceil_mode", source)
        if kind == "AvgPool2d" and kw.get("divisor_override"):
            raise _unsupported(f"{where} with divisor_override", source)
        return [("", (M.maxpool if kind == "MaxPool2d" else M.avgpool)(k, s))]
    if kind in ("BatchNorm2d", "BatchNorm1d"):
        if kw.get("affine") is False or kw.get("track_running_stats") is False:
            raise _unsupported(f"{where} without affine parameters or running statistics", source)
        return [(key, M.batchnorm(f"bn{key}", float(kw.get("eps", 1e-5))))]
    if kind == "Linear":
        return [(key, M.dense(f"fc{key}", int(kw.get("out_features", args[1] if len(args) > 1 else 0))))]
    if kind == "ReLU":
        return [("", M.RELU)]
    if kind == "Flatten":
        if kw.get("start_dim", 1) != 1 or kw.get("end_dim", -1) != -1:
            raise _unsupported(f"{where} other than start_dim=1", source)
        return [("", M.FLATTEN)]
    if kind == "Dropout":
        return [("", M.dropout(float(kw.get("p", 0.5))))]
    if kind == "Softmax":
        return [("", M.SOFTMAX)]
    raise _unsupported(where, source)


def from_torch(state_dict_path: Path, modules_path: Path, input_shape, name: str):
    """-> (spec, arrays in the neutral layout)."""
    from cnnsql.engines.torch_engine import import_torch

    _size_check(modules_path, MAX_MODULES_BYTES)
    _size_check(state_dict_path, MAX_WEIGHTS_BYTES)
    layers = torch_layers(modules_path.read_text(errors="replace"), str(modules_path))
    spec = _spec(name, input_shape, [layer for _, layer in layers], str(modules_path))
    torch = import_torch()
    try:
        sd = torch.load(state_dict_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad or unsafe file
        raise CnnsqlError(f"{state_dict_path} is not a readable state dict: {str(exc).splitlines()[0][:160]}",
                          "save it with torch.save(model.state_dict(), PATH)") from None
    if not isinstance(sd, dict):
        raise CnnsqlError(f"{state_dict_path} holds a {type(sd).__name__}, not a state dict",
                          "save it with torch.save(model.state_dict(), PATH)")
    arrays = {}
    for key, layer in layers:
        if not layer.params:
            continue
        params = ("weight", "bias", "running_mean", "running_var") if layer.kind == "batchnorm" else ("weight", "bias")
        for p in params:
            t = sd.get(f"{key}.{p}")
            if t is None and p == "bias":   # bias=False: a zero bias computes the same
                t = torch.zeros(sd[f"{key}.weight"].shape[0])
            if t is None:
                raise CnnsqlError(f"{state_dict_path}: no {key}.{p} for module ({key})",
                                  "the state dict and the module list must come from the same model")
            arrays[f"{layer.name}.{p}"] = t.detach().cpu().numpy()
    return spec, arrays


def _spec(name, input_shape, layers, source) -> M.ModelSpec:
    if not layers or layers[-1].kind != "softmax":
        layers = [*layers, M.SOFTMAX]
    try:
        return M.ModelSpec(name, tuple(input_shape), tuple(layers))
    except CnnsqlError as exc:
        raise CnnsqlError(f"{source}: {exc.problem}", exc.hint) from None


# --- Keras -----------------------------------------------------------------------------------------

def keras_layers(model, source: str) -> list[tuple[str, M.Layer]]:
    out = []
    for i, kl in enumerate(model.layers):
        cfg = kl.get_config()
        kind = type(kl).__name__
        name = re.sub(r"\W", "_", kl.name)
        if not name.isidentifier():
            name = f"layer{i}_{name}"
        where = f"{kl.name!r} ({kind})"
        if cfg.get("data_format", "channels_last") != "channels_last":
            raise _unsupported(f"{where} with data_format {cfg['data_format']}", source)
        act = cfg.get("activation")
        if kind == "Conv2D":
            if set(cfg["dilation_rate"]) != {1} or cfg.get("groups", 1) != 1:
                raise _unsupported(f"{where} with dilation or groups", source)
            out.append((kl.name, M.conv2d(name, cfg["filters"], _square(cfg["kernel_size"], "kernel", source),
                                          _square(cfg["strides"], "stride", source), cfg["padding"])))
        elif kind == "Dense":
            out.append((kl.name, M.dense(name, cfg["units"])))
        elif kind in ("MaxPooling2D", "AveragePooling2D"):
            if cfg["padding"] != "valid":
                raise _unsupported(f"{where} with padding {cfg['padding']}", source)
            k = _square(cfg["pool_size"], "pool size", source)
            s = _square(cfg["strides"] or k, "stride", source)
            out.append(("", (M.maxpool if kind == "MaxPooling2D" else M.avgpool)(k, s)))
        elif kind == "BatchNormalization":
            axis = cfg["axis"][0] if isinstance(cfg["axis"], list) else cfg["axis"]
            if axis not in (-1, len(kl.input.shape) - 1) or not cfg["center"] or not cfg["scale"]:
                raise _unsupported(f"{where} other than over the channel axis with center and scale", source)
            out.append((kl.name, M.batchnorm(name, float(cfg["epsilon"]))))
        elif kind == "Flatten":
            out.append(("", M.FLATTEN))
        elif kind == "Dropout":
            out.append(("", M.dropout(float(cfg["rate"]))))
        elif kind == "ReLU":
            if cfg.get("max_value") is not None or cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
                raise _unsupported(f"{where} with max_value, negative_slope or threshold", source)
            act = "relu"
        elif kind == "Softmax":
            act = "softmax"
        elif kind == "Activation":
            pass
        else:
            raise _unsupported(where, source)
        if act not in (None, "linear", "relu", "softmax"):
            raise _unsupported(f"{where} activation {act!r}", source)
        if act == "relu":
            out.append(("", M.RELU))
        elif act == "softmax":
            out.append(("", M.SOFTMAX))
    return out


def from_keras(path: Path, name: str):
    """-> (spec, arrays in the neutral layout)."""
    from cnnsql.engines.tensorflow_engine import flat_order, import_tf

    _size_check(path, MAX_WEIGHTS_BYTES)
    tf = import_tf()
    try:
        model = tf.keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a bad file
        raise CnnsqlError(f"{path} is not a readable Keras model: {str(exc).splitlines()[0][:160]}",
                          "save it with model.save('model.keras')") from None
    if type(model).__name__ != "Sequential":
        raise CnnsqlError(f"{path} holds a {type(model).__name__} model, not a Sequential one",
                          "cnnsql imports Sequential models")
    shape = model.input_shape
    if len(shape) != 4:
        raise CnnsqlError(f"{path}: input shape {shape} is not (batch, height, width, channels)")
    layers = keras_layers(model, str(path))
    spec = _spec(name, (shape[3], shape[1], shape[2]), [layer for _, layer in layers], str(path))
    perms = flat_order(spec)
    arrays = {}
    for kname, layer in layers:
        if not layer.params:
            continue
        ws = model.get_layer(kname).get_weights()
        inv = np.argsort(perms[layer.name]) if layer.name in perms else slice(None)
        if layer.kind == "conv2d":
            values = [ws[0].transpose(3, 2, 0, 1), ws[1] if len(ws) > 1 else np.zeros(layer.filters)]
        elif layer.kind == "dense":
            values = [ws[0][inv].T, ws[1] if len(ws) > 1 else np.zeros(layer.units)]
        else:
            values = [v[inv] for v in ws]
        for p, v in zip(("weight", "bias", "running_mean", "running_var"), values):
            arrays[f"{layer.name}.{p}"] = np.asarray(v)
    return spec, arrays


def import_command(args) -> None:
    name = args.name or Path(args.out).stem
    if getattr(args, "onnx", None):
        if args.torch or args.modules or args.keras:
            raise CnnsqlError("--onnx cannot be combined with --torch/--modules/--keras", "import one model at a time")
        from cnnsql.engines.onnx_import import from_onnx

        spec, arrays = from_onnx(args.onnx, name, args.input)
        source = {"onnx": str(args.onnx)}
    elif args.keras:
        if args.torch or args.modules:
            raise CnnsqlError("--keras cannot be combined with --torch/--modules", "import one model at a time")
        spec, arrays = from_keras(args.keras, name)
        source = {"keras": str(args.keras)}
    else:
        if not (args.torch and args.modules and args.input):
            raise CnnsqlError("a PyTorch import needs --torch STATE_DICT, --modules TEXT and --input CxHxW",
                              "or import a Keras model with --keras FILE")
        spec, arrays = from_torch(args.torch, args.modules, args.input, name)
        source = {"torch_state_dict": str(args.torch), "modules": str(args.modules)}
    manifest = {"trained_by": "import", "imported_from": source}
    if args.classes:
        manifest["class_names"] = [c.strip() for c in args.classes.split(",")]
    save_weights(args.out, arrays, manifest, spec)
    for line in spec.describe():
        print(line)
    print(f"-> {args.out}")


def register(sub) -> None:
    def shape(text: str):
        parts = text.lower().split("x")
        if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
            import argparse

            raise argparse.ArgumentTypeError(f"expected CxHxW (e.g. 3x32x32), got {text!r}")
        return tuple(int(p) for p in parts)

    im = sub.add_parser("import", help="convert an ONNX model, a PyTorch nn.Sequential or a Keras Sequential model "
                        "to a weights file")
    im.add_argument("--torch", type=Path, metavar="STATE_DICT", help="torch.save(model.state_dict(), ...) file")
    im.add_argument("--modules", type=Path, metavar="TEXT", help="the module list as print(model) writes it")
    im.add_argument("--input", type=shape, metavar="CxHxW", help="input image shape (PyTorch import)")
    im.add_argument("--keras", type=Path, metavar="FILE", help="a .keras file of a Sequential model")
    im.add_argument("--onnx", type=Path, metavar="FILE", help="an .onnx model (any graph of the supported operators; "
                    "--input CxHxW where the file leaves the image size open)")
    im.add_argument("--name", help="model name (default: the output file's stem)")
    im.add_argument("--classes", help="comma-separated class names, in label order")
    im.add_argument("--out", type=Path, required=True, help="weights file to write (.npz; manifest beside it)")
    im.set_defaults(func=lambda args: import_command(args) or 0)
