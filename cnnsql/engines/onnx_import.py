"""`cnnsql import --onnx FILE`: an ONNX model -> a cnnsql model description (version 2 graph) and weights.

The file is read with the `onnx` package (protobuf only: nothing in it is executed), after its size
is checked; tensors stored outside the file (external data) are refused. Nodes map one to one onto
description layers, in the file's (topological) order:

  ONNX                         description
  ---------------------------  ----------------------------------------------------------------
  Conv                         conv2d (square kernel, stride 1 or 2, group, pads or SAME_UPPER/VALID;
                               no bias: a zero bias)
  BatchNormalization           batchnorm (inference form)
  Relu, Clip(0, 6)             relu, relu6
  Add                          add (two computed inputs); a constant added to a MatMul's output is its bias
  Mul, Add by a constant       per channel (or feature): a batchnorm (gamma, beta), merged in sequence
                               (how tf2onnx writes a Keras BatchNormalization that follows no conv)
  Concat (axis 1)              concat (of one input: that input)
  MaxPool, AveragePool         maxpool, avgpool (pads; AveragePool with pads only without count_include_pad)
  GlobalAveragePool,           global_avgpool
  ReduceMean over (2, 3)       global_avgpool (without keepdims: then flatten)
  Flatten (axis 1), Reshape,   flatten (Reshape only to (batch, -1) or (batch, features), Squeeze only
  Squeeze                      of the 1 x 1 map a global pooling leaves)
  Transpose                    only NHWC -> NCHW right after the input (Keras through tf2onnx)
  Gemm, MatMul (+ Add)         dense
  Softmax (last axis)          softmax (appended when the model ends in logits)
  Dropout, Identity            the tensor they read

Constants (initializers, Constant nodes, and the Shape/Gather/Unsqueeze/Concat/Cast/Squeeze/
Reshape/arithmetic chains exporters emit around Reshape, Clip and ReduceMean) are folded at import.
Anything else is one error naming the first unsupported node and its operator.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cnnsql.core.errors import CnnsqlError
from cnnsql.models import model_spec as M
from cnnsql.models.weights import MAX_WEIGHTS_BYTES

SUPPORTED = ("Conv", "BatchNormalization", "Relu", "Clip", "Add", "Concat", "MaxPool", "AveragePool",
             "GlobalAveragePool", "ReduceMean", "Flatten", "Reshape", "Squeeze", "Gemm", "MatMul", "Softmax",
             "Dropout", "Identity", "Transpose (input NHWC -> NCHW)")
FOLDABLE = ("Constant", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "Reshape", "Mul", "Add",
            "Sub", "Div", "Identity", "Slice")
BATCH = -(1 << 40)   # the batch dimension in folded shapes (Shape of the input)


def _unsupported(source: str, node, why: str = "") -> CnnsqlError:
    name = node.name or (node.output[0] if node.output else "?")
    return CnnsqlError(f"{source}: unsupported node {name[:80]!r} ({node.op_type}){': ' + why if why else ''}",
                       f"cnnsql imports {', '.join(SUPPORTED)} (docs/models-and-data.md 'ONNX')")


def _attrs(node) -> dict:
    from onnx import helper

    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _axes(node, a: dict, consts: dict) -> list[int] | None:
    """A ReduceMean's or Squeeze's axes (attribute, or a constant second input since opset 13/18),
    sorted and non-negative for a 4-D tensor; None when not given."""
    axes = a.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = consts.get(node.input[1])
    return sorted(int(v) % 4 for v in np.asarray(axes).reshape(-1)) if axes is not None else None


def _ident(text: str, used: set[str], fallback: str) -> str:
    name = re.sub(r"\W", "_", text or "").strip("_")[:60] or fallback
    if not name.isidentifier():
        name = f"n_{name}"
    if name == M.INPUT:
        name = "input_"
    base, i = name, 1
    while name in used:
        i += 1
        name = f"{base}_{i}"
    used.add(name)
    return name


def from_onnx(path: Path, name: str, input_shape=None):
    """-> (spec, arrays in the neutral layout). `input_shape` (C, H, W) where the file leaves them open."""
    path = Path(path)
    if not path.is_file():
        raise CnnsqlError(f"{path} not found", "give an existing .onnx file")
    size = path.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise CnnsqlError(f"{path} is {size:,} bytes, more than {MAX_WEIGHTS_BYTES:,}", "cnnsql imports small CNNs")
    import onnx
    from onnx import numpy_helper

    source = str(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types on a bad file
        raise CnnsqlError(f"{path} is not a readable ONNX model: {str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}",
                          "export it with torch.onnx.export or a Keras converter") from None
    graph = model.graph

    def array(t):
        if t.data_location == onnx.TensorProto.EXTERNAL or t.external_data:
            raise CnnsqlError(f"{source}: tensor {t.name[:80]!r} is stored outside the file (external data)",
                              "export with the weights inside the .onnx file (small models fit)")
        return numpy_helper.to_array(t)

    consts: dict[str, np.ndarray] = {t.name: array(t) for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in consts]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise CnnsqlError(f"{source}: has {len(inputs)} inputs and {len(graph.output)} outputs",
                          "cnnsql imports models of one image input and one output")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise CnnsqlError(f"{source}: input {inputs[0].name!r} has {len(dims)} dimensions, expected (batch, C, H, W)",
                          "cnnsql imports image models in NCHW layout")
    # Keras through tf2onnx: an NHWC input whose only reader is a Transpose to NCHW
    first = [n for n in graph.node if inputs[0].name in n.input]
    nhwc = None
    if len(first) == 1 and first[0].op_type == "Transpose" and list(_attrs(first[0]).get("perm", [])) == [0, 3, 1, 2]:
        nhwc = first[0]
        dims = [dims[0], dims[3], dims[1], dims[2]]
    shape = tuple(input_shape) if input_shape else tuple(dims[1:])
    if any(d is None or d < 1 for d in shape):
        raise CnnsqlError(f"{source}: the input's C, H, W are not fixed ({dims[1:]})", "give --input CxHxW")
    static_batch = dims[0]

    used: set[str] = set()
    layers: list[M.Layer] = []
    arrays: dict[str, np.ndarray] = {}
    where: dict[str, str] = {inputs[0].name: M.INPUT}   # tensor -> layer name reading it
    shapes: dict[str, tuple] = {inputs[0].name: shape}
    if nhwc is not None:
        where[nhwc.output[0]], shapes[nhwc.output[0]] = M.INPUT, shape
    readers: dict[str, int] = {}
    for n in graph.node:
        for t in n.input:
            readers[t] = readers.get(t, 0) + 1
    matmul_of: dict[str, str] = {}   # tensor -> dense layer name (a MatMul whose bias is still zero)
    affine_of: dict[str, str] = {}   # tensor -> batchnorm layer made of a constant Mul/Add (more may fold in)
    affine_names: set[str] = set()

    def emit(node, layer: M.Layer, out_shape) -> None:
        layers.append(layer)
        where[node.output[0]] = layer.name
        shapes[node.output[0]] = out_shape

    for idx, node in enumerate(graph.node):
        op = node.op_type
        if node is nhwc:
            continue
        if node.domain not in ("", "ai.onnx"):
            raise _unsupported(source, node, f"domain {node.domain}")
        computed = [t for t in node.input if t and t in where]
        if not computed or op == "Shape":   # constant folding (a Shape's value is known at import)
            consts.update(_fold(node, consts, shapes, source))
            continue
        a = _attrs(node)
        x = node.input[0]
        if x not in where:
            raise _unsupported(source, node, "its first input is a constant")
        xin = where[x]
        xs = shapes[x]
        lname = _ident(node.name or node.output[0], used, f"{op.lower()}{idx}")
        if op in ("Dropout", "Identity") or op == "Concat" and len([t for t in node.input if t]) == 1:
            where[node.output[0]], shapes[node.output[0]] = xin, xs  # a one-input Concat passes it on
            continue
        if op == "Conv":
            w = consts.get(node.input[1]) if len(node.input) > 1 else None
            if w is None or w.ndim != 4:
                raise _unsupported(source, node, "weights are not a constant 4-D tensor")
            k = w.shape[2]
            strides = a.get("strides", [1, 1])
            if w.shape[3] != k or list(a.get("kernel_shape", [k, k])) != [k, k]:
                raise _unsupported(source, node, f"kernel {list(w.shape[2:])} is not square")
            if any(d != 1 for d in a.get("dilations", [1, 1])) or len(set(strides)) != 1 or strides[0] not in (1, 2):
                raise _unsupported(source, node, f"dilations {a.get('dilations')} / strides {strides} (dilation 1, "
                                   "stride 1 or 2 on both axes)")
            padding = _pads(node, a, source, k)
            bias = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(w.shape[0])
            if bias is None:
                raise _unsupported(source, node, "bias is not a constant")
            layer = M.conv2d(lname, int(w.shape[0]), int(k), int(strides[0]), padding, int(a.get("group", 1)), xin)
        elif op == "BatchNormalization":
            if a.get("training_mode", 0):
                raise _unsupported(source, node, "training_mode")
            params = [consts.get(t) for t in node.input[1:5]]
            if any(p is None for p in params) or len(node.output) > 1 and any(node.output[1:]):
                raise _unsupported(source, node, "statistics are not constants, or running outputs are used")
            layer = M.Layer("batchnorm", name=lname, eps=float(a.get("epsilon", 1e-5)), inputs=(xin,))
        elif op == "Relu":
            layer = M.node("relu", lname, xin)
        elif op == "Clip":
            lo = a.get("min", consts.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None)
            hi = a.get("max", consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None)
            if lo is None or hi is None or float(np.asarray(lo)) != 0.0 or float(np.asarray(hi)) != 6.0:
                raise _unsupported(source, node, f"Clip({lo}, {hi}) (only Clip(0, 6), relu6)")
            layer = M.node("relu6", lname, xin)
        elif op == "Add" and node.input[1] in where:
            layer = M.node("add", lname, [xin, where[node.input[1]]])
        elif op in ("Add", "Mul"):   # by a constant: a MatMul's bias, or a per-channel scale/shift (batchnorm)
            c = _per_channel(consts.get(node.input[1]), xs)
            if c is None:
                raise _unsupported(source, node, "a constant that is neither a MatMul's bias nor per channel")
            target = matmul_of.pop(x, None) if op == "Add" and readers.get(x) == 1 else None
            target = target or (affine_of.pop(x, None) if readers.get(x) == 1 else None)
            if target is not None and op == "Add":          # shift the layer that wrote x
                arrays[f"{target}.bias"] = arrays[f"{target}.bias"] + c
            elif target is not None and target in affine_names:  # scale an affine layer: both its parameters
                arrays[f"{target}.weight"] = arrays[f"{target}.weight"] * c
                arrays[f"{target}.bias"] = arrays[f"{target}.bias"] * c
            if target is not None:
                where[node.output[0]], shapes[node.output[0]] = xin, xs
                if target in affine_names:
                    affine_of[node.output[0]] = target
                continue
            eps = 1e-5                                       # (x - 0) / sqrt(1 - eps + eps) * gamma + beta
            one, zero = np.ones(xs[0]), np.zeros(xs[0])
            gamma, beta = (c, zero) if op == "Mul" else (one, c)
            layer = M.Layer("batchnorm", name=lname, eps=eps, inputs=(xin,))
            params = [gamma, beta, zero, np.full(xs[0], 1.0 - eps)]
            affine_names.add(lname)
            affine_of[node.output[0]] = lname
        elif op == "Concat":
            if any(t not in where for t in node.input):
                raise _unsupported(source, node, "concatenates a constant")
            if not (a.get("axis") == 1 or a.get("axis") == -1 and len(xs) == 1):
                raise _unsupported(source, node, f"axis {a.get('axis')} (only channels, axis 1)")
            layer = M.node("concat", lname, [where[t] for t in node.input])
        elif op in ("MaxPool", "AveragePool"):
            k = list(a.get("kernel_shape", []))
            strides = a.get("strides", [1, 1])
            if len(k) != 2 or k[0] != k[1] or len(set(strides)) != 1 or a.get("ceil_mode", 0) \
                    or any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("storage_order", 0) \
                    or len([o for o in node.output if o]) > 1:
                raise _unsupported(source, node, f"kernel {k}, strides {strides}, ceil_mode, dilations or indices "
                                   "(square kernel, equal strides, floor, no indices)")
            padding = _pads(node, a, source, k[0])
            if op == "AveragePool" and a.get("count_include_pad", 0) and padding not in ("valid",):
                raise _unsupported(source, node, "count_include_pad=1 with padding (padded cells are not counted)")
            kind = "maxpool" if op == "MaxPool" else "avgpool"
            if padding == "same":
                padding = M.conv_padding(M.Layer(kind, kernel=k[0], stride=strides[0], padding="same"), xs[1], xs[2])
            layer = M.node(kind, lname, xin, kernel=int(k[0]), stride=int(strides[0]),
                           padding=None if padding == "valid" else tuple(int(v) for v in padding))
            if layer.padding is not None and not any(layer.padding):
                layer = M.node(kind, lname, xin, kernel=int(k[0]), stride=int(strides[0]))
        elif op == "GlobalAveragePool":
            layer = M.node("global_avgpool", lname, xin)
        elif op == "ReduceMean":
            axes = _axes(node, a, consts)
            if axes != [2, 3] or len(xs) != 3:
                raise _unsupported(source, node, f"axes {axes} (only the global average over H and W)")
            layer = M.node("global_avgpool", lname, xin)
            if not a.get("keepdims", 1):  # (N, C) out: the pooling, then a flatten of its 1 x 1 map
                layers.append(layer)
                layer = M.node("flatten", _ident(lname + "_flatten", used, f"flatten{idx}"), lname)
        elif op == "Flatten":
            if a.get("axis", 1) != 1:
                raise _unsupported(source, node, f"axis {a.get('axis')} (only 1)")
            layer = M.node("flatten", lname, xin)
        elif op == "Squeeze":
            axes = _axes(node, a, consts)
            if axes != [2, 3] or len(xs) != 3 or xs[1:] != (1, 1):
                raise _unsupported(source, node, f"squeeze of axes {axes} (only the 1x1 map after global pooling)")
            layer = M.node("flatten", lname, xin)
        elif op == "Reshape":
            target = consts.get(node.input[1])
            feats = int(np.prod(xs))
            ok = target is not None and target.ndim == 1 and len(target) == 2 and \
                (target[0] in (BATCH, -1, 0) or target[0] == static_batch) and target[1] in (-1, feats)
            if not ok:
                raise _unsupported(source, node, f"reshape to {None if target is None else target.tolist()} "
                                   "(only flatten: (batch, -1))")
            layer = M.node("flatten", lname, xin)
        elif op in ("Gemm", "MatMul"):
            wt = consts.get(node.input[1]) if len(node.input) > 1 else None
            if wt is None or wt.ndim != 2 or len(xs) != 1:
                raise _unsupported(source, node, "weights are not a constant matrix, or the input is not flat")
            if op == "Gemm":
                if a.get("transA", 0):
                    raise _unsupported(source, node, "transA")
                wt = wt if a.get("transB", 0) else wt.T                 # (out, in)
                wt = wt * float(a.get("alpha", 1.0))
                c = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(wt.shape[0])
                if c is None:
                    raise _unsupported(source, node, "bias is not a constant")
                bias = np.broadcast_to(np.asarray(c, np.float64).reshape(-1) * float(a.get("beta", 1.0)), (wt.shape[0],))
            else:
                wt, bias = wt.T, np.zeros(wt.shape[1])
            if wt.shape[1] != xs[0]:
                raise _unsupported(source, node, f"weights {list(wt.shape)} do not take its {xs[0]} features")
            layer = M.Layer("dense", name=lname, units=int(wt.shape[0]), inputs=(xin,))
            arrays[f"{lname}.weight"], arrays[f"{lname}.bias"] = np.asarray(wt), np.array(bias, np.float64)
            if op == "MatMul":
                matmul_of[node.output[0]] = lname
        elif op == "Softmax":
            if a.get("axis", -1) not in (1, -1) or len(xs) != 1:
                raise _unsupported(source, node, f"axis {a.get('axis')} (only over the class scores)")
            layer = M.node("softmax", lname, xin)
        else:
            raise _unsupported(source, node)
        if op == "Conv":
            arrays[f"{lname}.weight"], arrays[f"{lname}.bias"] = w, np.asarray(bias)
        elif op == "BatchNormalization" or layer.kind == "batchnorm":
            for p, v in zip(("weight", "bias", "running_mean", "running_var"), params):
                arrays[f"{lname}.{p}"] = v
        try:
            out_shape = M.partial_shapes(name, shape, [*layers, layer])[-1]
        except CnnsqlError as exc:
            raise CnnsqlError(f"{source}: node {(node.name or node.output[0])[:80]!r} ({op}): {exc.problem}",
                              exc.hint) from None
        emit(node, layer, out_shape)
    out = graph.output[0].name
    if out not in where or not layers:
        raise CnnsqlError(f"{source}: the output {out!r} is not computed from the image", "export the model's forward pass")
    if where[out] != layers[-1].name:
        raise CnnsqlError(f"{source}: the output {out!r} is not the last node's", "export the model's forward pass")
    if layers[-1].kind != "softmax":
        layers.append(M.node("softmax", _ident("softmax", used, "softmax"), layers[-1].name))
    try:
        spec = M.ModelSpec(name, shape, tuple(layers))
    except CnnsqlError as exc:
        raise CnnsqlError(f"{source}: {exc.problem}", exc.hint) from None
    return spec, arrays


def _per_channel(c, shape) -> np.ndarray | None:
    """A constant that broadcasts over the channels (or features) of a (C, H, W) or (F,) tensor -> (C,)."""
    if c is None:
        return None
    c = np.asarray(c, np.float64)
    n = shape[0]
    if c.size == 1:
        return np.full(n, float(c.reshape(-1)[0]))
    squeezed = c.reshape([d for d in c.shape if d != 1] or [1])
    expected = (n, 1, 1) if len(shape) == 3 else (n,)
    trailing = c.shape[-len(expected):] if c.ndim >= len(expected) else None
    if squeezed.shape == (n,) and trailing == expected and all(d == 1 for d in c.shape[:-len(expected)]):
        return squeezed
    return None


def _pads(node, a: dict, source: str, k: int):
    """ONNX pads [top, left, bottom, right] or auto_pad -> the description's padding."""
    auto = a.get("auto_pad", "NOTSET")
    if auto == "VALID":
        return "valid"
    if auto == "SAME_UPPER":
        return "same"
    if auto not in ("NOTSET", ""):
        raise _unsupported(source, node, f"auto_pad {auto}")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if len(pads) != 4:
        raise _unsupported(source, node, f"pads {pads}")
    top, left, bottom, right = (int(v) for v in pads)
    if not any((top, left, bottom, right)):
        return "valid"
    return (top, bottom, left, right)


def _fold(node, consts: dict, shapes: dict, source: str) -> dict:
    """The outputs of a node whose inputs are all constants (or a Shape of a computed tensor)."""
    from onnx import numpy_helper

    op, a = node.op_type, _attrs(node)
    if op not in FOLDABLE:
        raise _unsupported(source, node, "on constants")
    ins = []
    for t in node.input:
        if not t:
            ins.append(None)
        elif t in consts:
            ins.append(consts[t])
        elif op == "Shape" and t in shapes:
            ins.append(None)
        else:
            raise _unsupported(source, node, f"input {t[:60]!r} is neither computed nor constant")
    if op == "Constant":
        if "value" not in node.attribute[0].name and not any(k in a for k in ("value", "value_float", "value_int",
                                                                              "value_floats", "value_ints")):
            raise _unsupported(source, node, "sparse or string constant")
        v = a.get("value")
        v = numpy_helper.to_array(v) if v is not None else np.asarray(
            a.get("value_float", a.get("value_int", a.get("value_floats", a.get("value_ints")))))
        return {node.output[0]: v}
    if op == "Shape":
        t = node.input[0]
        full = np.array([BATCH, *shapes[t]], np.int64) if t in shapes else np.array(ins[0].shape, np.int64)
        return {node.output[0]: full[a.get("start", 0):a.get("end", None)]}
    x = ins[0]
    if op == "Identity":
        v = x
    elif op == "Cast":
        v = x.astype({1: np.float32, 6: np.int32, 7: np.int64, 11: np.float64}.get(a.get("to"), x.dtype))
    elif op == "Gather":
        v = np.take(x, ins[1].astype(np.int64), axis=a.get("axis", 0))
    elif op == "Unsqueeze":
        axes = a.get("axes", ins[1] if len(ins) > 1 else None)
        v = x
        for ax in sorted(int(i) for i in np.asarray(axes).reshape(-1)):
            v = np.expand_dims(v, ax)
    elif op == "Squeeze":
        axes = a.get("axes", ins[1] if len(ins) > 1 else None)
        v = np.squeeze(x, tuple(int(i) for i in np.asarray(axes).reshape(-1))) if axes is not None else np.squeeze(x)
    elif op == "Concat":
        v = np.concatenate([np.atleast_1d(i) for i in ins], axis=a.get("axis", 0))
    elif op == "Reshape":
        v = x.reshape([int(d) for d in ins[1]])
    elif op == "Slice":
        starts, ends = ins[1], ins[2]
        axes = ins[3] if len(ins) > 3 and ins[3] is not None else range(len(starts))
        steps = ins[4] if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
        sl = [slice(None)] * x.ndim
        for s_, e_, ax, st in zip(starts, ends, axes, steps):
            sl[int(ax)] = slice(int(s_), int(e_), int(st))
        v = x[tuple(sl)]
    else:
        v = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "Div": np.divide}[op](x, ins[1])
    return {node.output[0]: np.asarray(v)}
