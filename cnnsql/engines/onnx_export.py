"""A model description and its weights as an ONNX graph (opset 17), written by cnnsql itself with the
`onnx` package: what the ONNX Runtime engine runs.

The graph takes the stored images as they are: input `images`, uint8 (N, C, H, W); it casts them to
float32 and scales by 1/255 (as every engine does), then one ONNX node per layer, in the description's
order, reading the outputs the layer names:
    conv2d -> Conv (pads top, left, bottom, right; group)     relu -> Relu       relu6 -> Clip(0, 6)
    maxpool -> MaxPool (padded cells never win)               avgpool -> AveragePool (count_include_pad 0)
    global_avgpool -> GlobalAveragePool                       batchnorm -> BatchNormalization
    add -> Sum        concat -> Concat (axis 1)        flatten -> Flatten (axis 1: (c, h, w) order)
    dense -> Gemm (transB: weights are (out, in))      dropout, identity -> Identity     softmax -> Softmax
Output `probs`: float32 (N, classes). Weights are initializers (float32) inside the model; no external data.
"""
from __future__ import annotations

import numpy as np

from cnnsql.models.model_spec import ModelSpec, conv_padding

OPSET = 17
INPUT, OUTPUT = "images", "probs"


def to_onnx(spec: ModelSpec, arrays: dict[str, np.ndarray]):
    """-> onnx.ModelProto (checked by onnx.checker)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        return name

    nodes.append(helper.make_node("Cast", [INPUT], ["x_float"], to=TensorProto.FLOAT))
    nodes.append(helper.make_node("Mul", ["x_float", const("inv255", np.float32(1 / 255.0))], ["x"]))
    names = {-1: "x"}
    for j, layer in enumerate(spec.layers):
        ins = [names[i] for i in spec.node_inputs(j)]
        out = OUTPUT if j == len(spec.layers) - 1 else f"n{j}"
        names[j] = out
        kind, p = layer.kind, f"{layer.name}."
        shape_in = spec.shape_of(spec.node_inputs(j)[0])
        if kind == "conv2d":
            top, bottom, left, right = conv_padding(layer, shape_in[1], shape_in[2])
            nodes.append(helper.make_node(
                "Conv", [ins[0], const(p + "weight", arrays[p + "weight"]), const(p + "bias", arrays[p + "bias"])],
                [out], kernel_shape=[layer.kernel] * 2, strides=[layer.stride] * 2,
                pads=[top, left, bottom, right], group=layer.groups or 1))
        elif kind in ("maxpool", "avgpool"):
            top, bottom, left, right = conv_padding(layer, shape_in[1], shape_in[2])
            extra = {"count_include_pad": 0} if kind == "avgpool" else {}
            nodes.append(helper.make_node("MaxPool" if kind == "maxpool" else "AveragePool", [ins[0]], [out],
                                          kernel_shape=[layer.kernel] * 2, strides=[layer.stride] * 2,
                                          pads=[top, left, bottom, right], **extra))
        elif kind == "batchnorm":
            nodes.append(helper.make_node(
                "BatchNormalization", [ins[0]] + [const(p + k, arrays[p + k]) for k in
                                                 ("weight", "bias", "running_mean", "running_var")],
                [out], epsilon=float(layer.eps)))
        elif kind == "dense":
            nodes.append(helper.make_node("Gemm", [ins[0], const(p + "weight", arrays[p + "weight"]),
                                                   const(p + "bias", arrays[p + "bias"])], [out], transB=1))
        elif kind == "relu6":
            nodes.append(helper.make_node("Clip", [ins[0], const(f"zero{j}", np.float32(0)),
                                                   const(f"six{j}", np.float32(6))], [out]))
        elif kind == "flatten":
            nodes.append(helper.make_node("Flatten", [ins[0]], [out], axis=1))
        elif kind == "concat":
            nodes.append(helper.make_node("Concat", ins, [out], axis=1))
        elif kind == "softmax":
            nodes.append(helper.make_node("Softmax", ins, [out], axis=1))
        else:
            op = {"relu": "Relu", "global_avgpool": "GlobalAveragePool", "add": "Sum", "identity": "Identity",
                  "dropout": "Identity"}[kind]
            nodes.append(helper.make_node(op, ins, [out]))
    c, h, w = spec.input_shape
    graph = helper.make_graph(
        nodes, f"cnnsql-{spec.name}",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["n", c, h, w])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["n", spec.num_classes])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cnnsql")
    model.ir_version = min(model.ir_version, 9)  # readable by ONNX Runtime releases of the last years
    onnx.checker.check_model(model)
    return model
