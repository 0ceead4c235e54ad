"""Any model of the description (cnnsql.model_spec) as one Velox plan: one generator per layer kind.

Every activation is one flat REAL array per image row in HWC order (index (y * W + x) * C + c), so
each layer is index arithmetic and lambdas over it. The weights are columns of the one joined
ticket row (never literals), laid out here by NumPy reorders and folds only:

  layer kind   plan form (per image row)                                   weight columns
  -----------  ----------------------------------------------------------  ----------------------------
  input        x = img (CHW) gathered into HWC, / 255                      -
  conv2d       zero padding ("same") as a gather; patches of K*K*C values  w<i> (F x K*K*C), b<i> (F)
               (dy, dx, c) per output pixel; F dots per patch (+ ReLU)
  batchnorm    folded into the conv2d/dense right before it; else x * s + t   s<i>, t<i> (tiled, H*W*C)
  relu         fused into the conv2d/dense before it; else greatest(x, 0)  -
  max/avgpool  one greatest(...) / sum(...) / K^2 over K*K gathers          -
  flatten      nothing: the next dense layer's columns are reordered from (c, h, w) to HWC
  dense        one dot per unit (+ ReLU)                                   w<i> (units x in), b<i>
  dropout      nothing (identity at inference)
  softmax      exp(x - max) / sum                                          -

This is the direct form: every multiply-add of the model runs (`macs()`). The study's CNN keeps
its own faster plan (velox_plan.py: Winograd F(4,3) conv2 with the pool inside the tile, fc1 in
weight blocks); VeloxEngine chooses it when the description is the study's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnsql.models.model_spec import ModelSpec, conv_padding

R0 = "REAL '0.0'"
GENERATED = ("conv2d", "relu", "maxpool", "avgpool", "batchnorm", "flatten", "dense", "dropout", "softmax")


def seq(n: int) -> str:
    """The indices 0..n-1 as an array (Presto's sequence() stops at 10,000 entries: longer ones are
    flattened from chunks of 8,192)."""
    if n <= 10_000:
        return f"sequence(0, {n - 1})"
    chunks = -(-n // 8192)
    return f"flatten(transform(sequence(0, {chunks - 1}), b -> sequence(b * 8192, least(b * 8192 + 8191, {n - 1}))))"


def _dot(a: str, b: str) -> str:
    return f"cast(array_sum(zip_with({a}, {b}, (p, q) -> p * q)) AS real)"


@dataclass(frozen=True)
class Op:
    """One generated step: its projections (lists of new columns) and the weight columns it reads."""
    kind: str
    projections: list[list[str]]       # each: expressions of one project node (without carried columns)
    weights: dict[str, np.ndarray]     # column name -> float32 array (1-D or 2-D)


def _fold_batchnorm(arrays: dict, name: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference batch-norm as y = x * scale + shift (float64)."""
    g, b = arrays[f"{name}.weight"].astype(np.float64), arrays[f"{name}.bias"].astype(np.float64)
    m, v = arrays[f"{name}.running_mean"].astype(np.float64), arrays[f"{name}.running_var"].astype(np.float64)
    scale = g / np.sqrt(v + eps)
    return scale, b - m * scale


def build_ops(spec: ModelSpec, arrays: dict[str, np.ndarray], winograd: bool = True) -> list[Op]:
    """The model as generated steps, each reading column `a` and writing column `a` (flat HWC).
    `winograd`: conv2d + max-pool as Winograd F(4,3) where winograd_fits(); else the direct form."""
    c, h, w = spec.input_shape
    ops = [Op("input", [[f"transform({seq(h * w * c)}, i -> element_at(img, (i % {c}) * {h * w} "
                         f"+ i / {c} + 1) / REAL '255.0') AS a"]], {})]
    shape = (c, h, w)
    layers, shapes = spec.layers, spec.shapes
    flat_from: tuple[int, int, int] | None = None   # (c, h, w) before a flatten not yet consumed by a dense
    i = 0
    while i < len(layers):
        layer = layers[i]
        out_shape = shapes[i]
        nxt = layers[i + 1] if i + 1 < len(layers) else None
        if layer.kind in ("conv2d", "dense"):
            wt = arrays[f"{layer.name}.weight"].astype(np.float64)
            bias = arrays[f"{layer.name}.bias"].astype(np.float64)
            if nxt is not None and nxt.kind == "batchnorm":        # fold: (W x + b) * s + t
                scale, shift = _fold_batchnorm(arrays, nxt.name, nxt.eps)
                wt = wt * scale.reshape((-1,) + (1,) * (wt.ndim - 1))
                bias = bias * scale + shift
                i += 1
                nxt = layers[i + 1] if i + 1 < len(layers) else None
            relu = nxt is not None and nxt.kind == "relu"
            if relu:
                i += 1
            after = layers[i + 1] if i + 1 < len(layers) else None
            if layer.kind == "conv2d" and winograd and winograd_fits(layer, shapes[i], after):
                ops.append(winograd_op(len(ops), layer, shape, shapes[i], wt, bias, relu))
                i += 1                                                 # the max-pool runs inside the tiles
            elif layer.kind == "conv2d":
                ops.append(conv_op(len(ops), layer, shape, wt, bias, relu))
            else:
                if flat_from is not None:   # columns (c, h, w) -> HWC, the order of `a`
                    fc, fh, fw = flat_from
                    wt = wt.reshape(len(wt), fc, fh, fw).transpose(0, 2, 3, 1).reshape(len(wt), -1)
                    flat_from = None
                ops.append(dense_op(len(ops), wt, bias, relu))
            shape = shapes[i]
        elif layer.kind == "batchnorm":
            scale, shift = _fold_batchnorm(arrays, layer.name, layer.eps)
            reps = int(np.prod(out_shape[1:])) if len(out_shape) == 3 else 1
            k = len(ops)
            ops.append(Op("batchnorm", [[f"zip_with(zip_with(a, s{k}, (x, y) -> x * y), t{k}, (x, y) -> x + y) AS a"]],
                          {f"s{k}": np.tile(scale, reps).astype(np.float32), f"t{k}": np.tile(shift, reps).astype(np.float32)}))
            shape = out_shape
        elif layer.kind == "relu":
            ops.append(Op("relu", [[f"transform(a, x -> greatest(x, {R0})) AS a"]], {}))
        elif layer.kind in ("maxpool", "avgpool"):
            ops.append(pool_op(layer, shape, out_shape))
            shape = out_shape
        elif layer.kind == "flatten":
            flat_from = shape
            shape = out_shape
        elif layer.kind == "softmax":
            ops.append(Op("softmax", [["transform(a, v -> exp(v - array_max(a))) AS e"],
                                      ["transform(e, v -> v / array_sum(e)) AS a"]], {}))
        elif layer.kind != "dropout":
            raise ValueError(f"layer kind {layer.kind!r} has no Velox generator")
        i += 1
    return ops


def conv_op(k: int, layer, shape, wt: np.ndarray, bias: np.ndarray, relu: bool) -> Op:
    """Direct convolution over the flat HWC input (c, h, w) = shape; output (F, OH, OW) as flat HWC."""
    c, h, w = shape
    top, bottom, left, right = conv_padding(layer, h, w)
    hp, wp = h + top + bottom, w + left + right
    kk, s, f = layer.kernel, layer.stride, layer.filters
    oh, ow = (hp - kk) // s + 1, (wp - kk) // s + 1
    projections = []
    if top or bottom or left or right:   # zero padding as a gather over the padded grid
        inside = (f"(i / {c * wp}) >= {top} AND (i / {c * wp}) < {top + h} AND "
                  f"((i / {c}) % {wp}) >= {left} AND ((i / {c}) % {wp}) < {left + w}")
        src = f"((i / {c * wp} - {top}) * {w} + (i / {c}) % {wp} - {left}) * {c} + i % {c} + 1"
        projections.append([f"transform({seq(hp * wp * c)}, i -> if({inside}, element_at(a, {src}), "
                            f"{R0})) AS a"])
    patch = kk * kk * c
    base = f"((q / {ow}) * {s * wp} + (q % {ow}) * {s}) * {c}"
    off = f"((j / {kk * c}) * {wp} + (j / {c}) % {kk}) * {c} + j % {c}"
    projections.append([f"transform({seq(oh * ow)}, q -> transform({seq(patch)}, "
                        f"j -> element_at(a, {base} + {off} + 1))) AS p"])
    value = f"{_dot('pp', 'wk')} + bk"
    if relu:
        value = f"greatest({value}, {R0})"
    projections.append([f"flatten(transform(p, pp -> zip_with(w{k}, b{k}, (wk, bk) -> {value}))) AS a"])
    # weights (F, C, K, K) -> (F, K*K*C) in patch order (dy, dx, c)
    w2 = wt.transpose(0, 2, 3, 1).reshape(f, patch)
    return Op("conv2d", projections, {f"w{k}": w2.astype(np.float32), f"b{k}": bias.astype(np.float32)})


def winograd_fits(layer, out_shape, after) -> bool:
    """3x3 stride-1 convolution (after its folded batch-norm and ReLU) followed by a 2x2 max-pool of
    stride 2, output sides divisible by 4: Winograd F(4,3) with the pool inside each 4x4 tile."""
    return (layer.kernel == 3 and layer.stride == 1 and after is not None and after.kind == "maxpool"
            and after.kernel == 2 and after.stride == 2 and out_shape[1] % 4 == 0 and out_shape[2] % 4 == 0)


def winograd_op(k: int, layer, shape, conv_shape, wt: np.ndarray, bias: np.ndarray, relu: bool) -> Op:
    """conv2d + 2x2 max-pool as Winograd F(4,3) (the study's conv2 form, velox_plan.py, for any size):
    36 components of T tiles x F filters x C channels multiply-adds instead of 16 T x 9 F C; output
    the pooled map (F, OH/2, OW/2) as flat HWC."""
    from cnnsql.engines.velox_plan import AT, BT, G, lincomb
    c, h, w = shape
    f, oh, ow = conv_shape
    top, bottom, left, right = conv_padding(layer, h, w)
    hp, wp = h + top + bottom, w + left + right
    ti_n, tj_n = oh // 4, ow // 4
    tiles = ti_n * tj_n
    projections = []
    if top or bottom or left or right:
        projections.append(conv_op(k, layer, shape, wt, bias, relu).projections[0])   # the padding gather
    projections.append([f"transform({seq(hp * wp)}, q -> slice(a, q * {c} + 1, {c})) AS d"])  # pixels of C
    projections.append([f"transform({seq(ti_n * wp)}, r -> "
                        + lincomb([(BT[i, rr], f"element_at(d, (4 * (r / {wp}) + {rr}) * {wp} + r % {wp} + 1)")
                                   for rr in range(6)]) + f") AS z{i}" for i in range(6)])
    projections.append([f"transform({seq(tiles)}, t -> "
                        + lincomb([(BT[j, cc], f"element_at(z{i}, (t / {tj_n}) * {wp} + 4 * (t % {tj_n}) + {cc + 1})")
                                   for cc in range(6)]) + f") AS v{6 * i + j}" for i in range(6) for j in range(6)])
    projections.append([f"flatten(transform(v{x}, vv -> transform(u{k}_{x}, uu -> {_dot('vv', 'uu')}))) AS m{x}"
                        for x in range(36)])
    projections.append([f"{lincomb([(AT[b, j], f'm{6 * i + j}') for j in range(6)])} AS s{i}_{b}"
                        for i in range(6) for b in range(4)])
    projections.append([f"{lincomb([(AT[a, i], f's{i}_{b}') for i in range(6)])} AS y{a}_{b}"
                        for a in range(4) for b in range(4)])
    mx = "(p, q) -> greatest(p, q)"
    pools = [f"zip_with(zip_with(y{2 * pa}_{2 * pb}, y{2 * pa}_{2 * pb + 1}, {mx}), "
             f"zip_with(y{2 * pa + 1}_{2 * pb}, y{2 * pa + 1}_{2 * pb + 1}, {mx}), {mx})"
             for pa in range(2) for pb in range(2)]
    projections.append([f"concat({', '.join(pools)}) AS hh"])
    # hh[((2 pa + pb) T + t) F + o] -> HWC pooled (py, px, o) with py = 2 ti + pa, px = 2 tj + pb; + bias, ReLU
    ph, pw = oh // 2, ow // 2
    q = f"(i / {f})"
    src = (f"((2 * (({q} / {pw}) % 2) + {q} % {pw} % 2) * {tiles} + (({q} / {pw}) / 2) * {tj_n} + ({q} % {pw}) / 2) "
           f"* {f} + i % {f} + 1")
    value = f"element_at(hh, {src}) + element_at(b{k}, i % {f} + 1)"
    if relu:
        value = f"greatest({value}, {R0})"
    projections.append([f"transform({seq(ph * pw * f)}, i -> {value}) AS a"])
    u = np.einsum("ia,ocab,jb->ijoc", G, wt, G).reshape(36, f, c)
    weights = {f"u{k}_{x}": u[x].astype(np.float32) for x in range(36)}
    weights[f"b{k}"] = bias.astype(np.float32)
    return Op("winograd", projections, weights)


def dense_op(k: int, wt: np.ndarray, bias: np.ndarray, relu: bool) -> Op:
    value = f"{_dot('a', 'wk')} + bk"
    if relu:
        value = f"greatest({value}, {R0})"
    return Op("dense", [[f"zip_with(w{k}, b{k}, (wk, bk) -> {value}) AS a"]],
              {f"w{k}": wt.astype(np.float32), f"b{k}": bias.astype(np.float32)})


def pool_op(layer, shape, out_shape) -> Op:
    c, h, w = shape
    _, oh, ow = out_shape
    kk, s = layer.kernel, layer.stride
    q = f"(i / {c})"
    terms = [f"element_at(a, (({q} / {ow}) * {s} + {dy}) * {w * c} + (({q} % {ow}) * {s} + {dx}) * {c} + i % {c} + 1)"
             for dy in range(kk) for dx in range(kk)]
    if layer.kind == "maxpool":
        value = terms[0] if len(terms) == 1 else f"greatest({', '.join(terms)})"
    else:
        value = f"({' + '.join(terms)}) / REAL '{float(kk * kk)!r}'"
    return Op(layer.kind, [[f"transform({seq(oh * ow * c)}, i -> {value}) AS a"]], {})


def macs(spec: ModelSpec) -> int:
    """Multiply-adds per image of the direct form (conv2d and dense layers)."""
    total = 0
    for layer, (cin, *_), out in zip(spec.layers, spec.input_shapes(), spec.shapes):
        if layer.kind == "conv2d":
            total += int(np.prod(out)) * cin * layer.kernel ** 2
        elif layer.kind == "dense":
            total += out[0] * cin
    return total


# --- the plan ---------------------------------------------------------------------------------------

def weight_columns(ops: list[Op]) -> dict[str, np.ndarray]:
    return {name: arr for op in ops for name, arr in op.weights.items()}


def ticket_batch(pa, ops: list[Op], slot: int):
    """One ticket row: slot (BIGINT) and every weight column (REAL arrays, 2-D as arrays of arrays)."""
    from cnnsql.engines.velox_plan import list_array

    cols = {"slot": pa.array([slot], pa.int64())}
    for name, arr in weight_columns(ops).items():
        cols[name] = list_array(pa, arr[None])
    return pa.record_batch(cols)


def forward_plan(PlanBuilder, ops: list[Op], tickets, images) -> object:
    """tickets: PlanBuilder -> builder with the ticket source; images: image_batch() as a Velox vector.
    Output rows (rid, a): a = the class probabilities."""
    needed = [list(op.weights) for op in ops]
    pb = tickets(PlanBuilder())
    image_node = pb.new_builder().values([images]).get_plan_node()
    all_weights = [n for names in needed for n in names]
    pb = pb.hash_join(["slot"], ["slot"], image_node, ["rid", "img"] + all_weights)
    for idx, op in enumerate(ops):
        later = [n for names in needed[idx + 1:] for n in names]
        for j, projection in enumerate(op.projections):
            last = j == len(op.projections) - 1
            carry = ["rid"] + (later if last else later + list(op.weights))
            pb = pb.project(carry + projection)
    return pb.project(["rid", "a"]).get_plan_node()
