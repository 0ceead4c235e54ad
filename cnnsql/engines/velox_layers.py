"""Any model of the description (cnnsql.model_spec) as one Velox plan: one generator per layer kind.

Every activation is one flat REAL array per image row in HWC order (index (y * W + x) * C + c), so
each layer is index arithmetic and lambdas over it. A graph's outputs are columns of the same row
(n<j> for layer j): a branch reads the columns it names and every column still read later is carried
through each project node, so residual adds and concatenations are projections like any other and
the whole model stays one plan. The weights are columns of the one joined ticket row (never
literals), laid out here by NumPy reorders and folds only:

  layer kind   plan form (per image row)                                   weight columns
  -----------  ----------------------------------------------------------  ----------------------------
  input        x = img (CHW) gathered into HWC, / 255                      -
  conv2d       zero padding as a gather; patches of K*K*C values (dy, dx,  w<i> (F x K*K*C), b<i> (F)
               c) per output pixel; F dots per patch (+ ReLU/ReLU6);        (groups: G x F/G x K*K*C/G)
               groups: G patches of K*K*C/G per pixel, F/G dots each
  batchnorm    folded into the conv2d/dense it alone reads; else x * s + t  s<i>, t<i> (tiled, H*W*C)
  relu, relu6  fused into the conv2d/dense it alone reads; else greatest    -
  max/avgpool  one greatest(...) / sum(...) / K^2 over K*K gathers; padded: c<i> (avgpool: K^2 / cells)
               a gather first (-3.4e38 for max), avg divided by the cells
               inside the map
  global_avgpool  per channel: array_sum over H*W gathers / (H*W)          -
  add          zip_with(a, b, x + y) (chained for more inputs)             -
  concat       per pixel concat(slice(a, ..), slice(b, ..)); flat: concat  -
  flatten      nothing when it alone feeds a dense (whose columns are reordered from (c, h, w) to
               HWC); else a gather into (c, h, w) order
  dense        one dot per unit (+ ReLU/ReLU6)                             w<i> (units x in), b<i>
  dropout, identity  nothing (the column of their input)
  softmax      exp(x - max) / sum                                          -

This is the direct form: every multiply-add of the model runs (`macs()`). The study's CNN keeps
its own faster plan (velox_plan.py: Winograd F(4,3) conv2 with the pool inside the tile, fc1 in
weight blocks); VeloxEngine chooses it when the description is the study's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cnnsql.models.model_spec import ModelSpec, conv_padding, pool_counts

R0 = "REAL '0.0'"
GENERATED = ("conv2d", "relu", "relu6", "identity", "maxpool", "avgpool", "global_avgpool", "batchnorm", "add",
             "concat", "flatten", "dense", "dropout", "softmax")


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
    """One generated step: its projections (lists of new columns), the weight columns it reads, the
    columns of earlier steps its first projection reads, and the column its last one writes."""
    kind: str
    projections: list[list[str]]       # each: expressions of one project node (without carried columns)
    weights: dict[str, np.ndarray]     # column name -> float32 array (1-D or 2-D)
    reads: tuple[str, ...] = ()
    out: str = "a"


def _fold_batchnorm(arrays: dict, name: str, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Inference batch-norm as y = x * scale + shift (float64)."""
    g, b = arrays[f"{name}.weight"].astype(np.float64), arrays[f"{name}.bias"].astype(np.float64)
    m, v = arrays[f"{name}.running_mean"].astype(np.float64), arrays[f"{name}.running_var"].astype(np.float64)
    scale = g / np.sqrt(v + eps)
    return scale, b - m * scale


MIN_REAL = "REAL '-3.4028235E38'"   # the padding of a max-pool: never the largest of a window with a real cell
PASS = ("dropout", "identity")


def _act(value: str, act: str | None) -> str:
    if act == "relu":
        return f"greatest({value}, {R0})"
    if act == "relu6":
        return f"least(greatest({value}, {R0}), REAL '6.0')"
    return value


def build_ops(spec: ModelSpec, arrays: dict[str, np.ndarray], winograd: bool = True) -> list[Op]:
    """The model as generated steps in layer order. Step k reads the columns of the layers it names
    and writes column n<k> (flat HWC); the last step writes the class probabilities. Layers that
    compute nothing (dropout, identity, a flatten feeding a dense) are the column of their input; a
    batch norm and then a ReLU/ReLU6 read only by a conv2d or dense fold into it.
    `winograd`: conv2d + max-pool as Winograd F(4,3) where winograd_fits(); else the direct form."""
    c, h, w = spec.input_shape
    ops = [Op("input", [[f"transform({seq(h * w * c)}, i -> element_at(img, (i % {c}) * {h * w} "
                         f"+ i / {c} + 1) / REAL '255.0') AS n0"]], {}, ("img",), "n0")]
    layers, shapes, consumers = spec.layers, spec.shapes, spec.consumers()
    col = {-1: "n0"}                 # layer index -> the column holding its output
    hwc_flat: dict[str, tuple] = {}  # columns of a flatten left in HWC order -> the (c, h, w) it flattened
    done: set[int] = set()

    def sole(j: int, kinds) -> int | None:
        return consumers[j][0] if len(consumers[j]) == 1 and layers[consumers[j][0]].kind in kinds else None

    for i, layer in enumerate(layers):
        if i in done:
            continue
        k = len(ops)
        dst = f"n{k}"
        ins = [col[j] for j in spec.node_inputs(i)]
        src = ins[0]
        shape = spec.shape_of(spec.node_inputs(i)[0])
        kind = layer.kind
        if kind in ("conv2d", "dense"):
            wt = arrays[f"{layer.name}.weight"].astype(np.float64)
            bias = arrays[f"{layer.name}.bias"].astype(np.float64)
            last = i
            bn = sole(last, ("batchnorm",))
            if bn is not None:                                       # fold: (W x + b) * s + t
                scale, shift = _fold_batchnorm(arrays, layers[bn].name, layers[bn].eps)
                wt = wt * scale.reshape((-1,) + (1,) * (wt.ndim - 1))
                bias = bias * scale + shift
                done.add(bn)
                last = bn
            act_at = sole(last, ("relu", "relu6"))
            act = None
            if act_at is not None:
                act = layers[act_at].kind
                done.add(act_at)
                last = act_at
            pool = sole(last, ("maxpool",))
            if kind == "conv2d" and winograd and (layer.groups or 1) == 1 and pool is not None \
                    and layers[pool].padding is None and winograd_fits(layer, shapes[i], layers[pool]):
                ops.append(winograd_op(k, layer, shape, shapes[i], wt, bias, act, src, dst))
                done.add(pool)
                last = pool                                          # the max-pool runs inside the tiles
            elif kind == "conv2d":
                ops.append(conv_op(k, layer, shape, wt, bias, act, src, dst))
            else:
                if src in hwc_flat:   # columns (c, h, w) -> HWC, the order of a flatten left as it is
                    fc, fh, fw = hwc_flat[src]
                    wt = wt.reshape(len(wt), fc, fh, fw).transpose(0, 2, 3, 1).reshape(len(wt), -1)
                ops.append(dense_op(k, wt, bias, act, src, dst))
            for j in (i, bn, act_at, last):
                if j is not None:
                    col[j] = dst
            continue
        if kind in PASS:
            col[i] = src
            continue
        if kind == "flatten":
            fc, fh, fw = shape
            reader = i
            while sole(reader, PASS) is not None:
                reader = sole(reader, PASS)
            if fh * fw == 1:
                col[i] = src
            elif sole(reader, ("dense",)) is not None:
                col[i] = src
                hwc_flat[src] = shape
            else:
                ops.append(Op("flatten", [[f"transform({seq(fc * fh * fw)}, i -> element_at({src}, "
                                           f"(i % {fh * fw}) * {fc} + i / {fh * fw} + 1)) AS {dst}"]], {}, (src,), dst))
                col[i] = dst
            continue
        if kind == "batchnorm":
            scale, shift = _fold_batchnorm(arrays, layer.name, layer.eps)
            reps = int(np.prod(shape[1:])) if len(shape) == 3 else 1
            ops.append(Op("batchnorm", [[f"zip_with(zip_with({src}, s{k}, (x, y) -> x * y), t{k}, (x, y) -> x + y) "
                                         f"AS {dst}"]],
                          {f"s{k}": np.tile(scale, reps).astype(np.float32),
                           f"t{k}": np.tile(shift, reps).astype(np.float32)}, (src,), dst))
        elif kind in ("relu", "relu6"):
            ops.append(Op(kind, [[f"transform({src}, x -> {_act('x', kind)}) AS {dst}"]], {}, (src,), dst))
        elif kind in ("maxpool", "avgpool"):
            ops.append(pool_op(k, layer, shape, shapes[i], src, dst))
        elif kind == "global_avgpool":
            fc, fh, fw = shape
            ops.append(Op(kind, [[f"transform(sequence(0, {fc - 1}), ch -> cast(array_sum(transform({seq(fh * fw)}, "
                                  f"q -> element_at({src}, q * {fc} + ch + 1))) AS real) / REAL '{float(fh * fw)!r}') "
                                  f"AS {dst}"]], {}, (src,), dst))
        elif kind == "add":
            expr = f"zip_with({ins[0]}, {ins[1]}, (x, y) -> x + y)"
            for other in ins[2:]:
                expr = f"zip_with({expr}, {other}, (x, y) -> x + y)"
            ops.append(Op(kind, [[f"{expr} AS {dst}"]], {}, tuple(dict.fromkeys(ins)), dst))
        elif kind == "concat":
            in_shapes = [spec.shape_of(j) for j in spec.node_inputs(i)]
            if len(shapes[i]) == 1:
                expr = f"concat({', '.join(ins)})"
            else:
                _, oh, ow = shapes[i]
                parts = ", ".join(f"slice({a}, q * {s[0]} + 1, {s[0]})" for a, s in zip(ins, in_shapes))
                expr = f"flatten(transform({seq(oh * ow)}, q -> concat({parts})))"
            ops.append(Op(kind, [[f"{expr} AS {dst}"]], {}, tuple(dict.fromkeys(ins)), dst))
        elif kind == "softmax":
            ops.append(Op("softmax", [[f"transform({src}, v -> exp(v - array_max({src}))) AS e"],
                                      [f"transform(e, v -> v / array_sum(e)) AS {dst}"]], {}, (src,), dst))
        else:
            raise ValueError(f"layer kind {kind!r} has no Velox generator")
        col[i] = dst
    return ops


def _pad_gather(shape, pads, src: str, dst: str, fill: str = R0) -> str:
    """The zero (or `fill`) padded flat HWC map of `src` as column `dst`."""
    c, h, w = shape
    top, bottom, left, right = pads
    hp, wp = h + top + bottom, w + left + right
    inside = (f"(i / {c * wp}) >= {top} AND (i / {c * wp}) < {top + h} AND "
              f"((i / {c}) % {wp}) >= {left} AND ((i / {c}) % {wp}) < {left + w}")
    at = f"((i / {c * wp} - {top}) * {w} + (i / {c}) % {wp} - {left}) * {c} + i % {c} + 1"
    return f"transform({seq(hp * wp * c)}, i -> if({inside}, element_at({src}, {at}), {fill})) AS {dst}"


def conv_op(k: int, layer, shape, wt: np.ndarray, bias: np.ndarray, act, src: str = "a", dst: str = "a") -> Op:
    """Direct convolution over the flat HWC input (c, h, w) = shape; output (F, OH, OW) as flat HWC.
    `act`: None, "relu" or "relu6" (True: "relu")."""
    act = "relu" if act is True else (act or None)
    c, h, w = shape
    pads = conv_padding(layer, h, w)
    top, bottom, left, right = pads
    hp, wp = h + top + bottom, w + left + right
    kk, s, f, g = layer.kernel, layer.stride, layer.filters, layer.groups or 1
    oh, ow = (hp - kk) // s + 1, (wp - kk) // s + 1
    projections = []
    x = src
    if any(pads):   # zero padding as a gather over the padded grid
        projections.append([_pad_gather(shape, pads, src, "pd")])
        x = "pd"
    cg, fg = c // g, f // g
    patch = kk * kk * cg
    base = f"((q / {ow}) * {s * wp} + (q % {ow}) * {s}) * {c}"
    off = f"((j / {kk * cg}) * {wp} + (j / {cg}) % {kk}) * {c} + j % {cg}"
    value = _act(f"{_dot('pp', 'wk')} + bk", act)
    if g == 1:
        projections.append([f"transform({seq(oh * ow)}, q -> transform({seq(patch)}, "
                            f"j -> element_at({x}, {base} + {off} + 1))) AS p"])
        projections.append([f"flatten(transform(p, pp -> zip_with(w{k}, b{k}, (wk, bk) -> {value}))) AS {dst}"])
        # weights (F, C, K, K) -> (F, K*K*C) in patch order (dy, dx, c)
        w2 = wt.transpose(0, 2, 3, 1).reshape(f, patch)
    else:            # patches per group (G x K*K*C/G per pixel), weights per group (G x F/G x K*K*C/G)
        projections.append([f"transform({seq(oh * ow)}, q -> transform(sequence(0, {g - 1}), gi -> "
                            f"transform({seq(patch)}, j -> element_at({x}, {base} + gi * {cg} + {off} + 1)))) AS p"])
        dots = f"flatten(zip_with(pg, w{k}, (pp, wg) -> transform(wg, wk -> {_dot('pp', 'wk')})))"
        projections.append([f"flatten(transform(p, pg -> zip_with({dots}, b{k}, (v, bk) -> "
                            f"{_act('v + bk', act)}))) AS {dst}"])
        w2 = wt.transpose(0, 2, 3, 1).reshape(g, fg, patch)
    return Op("conv2d", projections, {f"w{k}": w2.astype(np.float32), f"b{k}": bias.astype(np.float32)},
              (src,), dst)


def winograd_fits(layer, out_shape, after) -> bool:
    """3x3 stride-1 convolution (after its folded batch-norm and ReLU) followed by a 2x2 max-pool of
    stride 2, output sides divisible by 4: Winograd F(4,3) with the pool inside each 4x4 tile."""
    return (layer.kernel == 3 and layer.stride == 1 and after is not None and after.kind == "maxpool"
            and after.kernel == 2 and after.stride == 2 and out_shape[1] % 4 == 0 and out_shape[2] % 4 == 0)


def winograd_op(k: int, layer, shape, conv_shape, wt: np.ndarray, bias: np.ndarray, act, src: str = "a",
                dst: str = "a") -> Op:
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
    act = "relu" if act is True else (act or None)
    projections = []
    x = src
    if top or bottom or left or right:
        projections.append([_pad_gather(shape, (top, bottom, left, right), src, "pd")])
        x = "pd"
    projections.append([f"transform({seq(hp * wp)}, q -> slice({x}, q * {c} + 1, {c})) AS d"])  # pixels of C
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
    at = (f"((2 * (({q} / {pw}) % 2) + {q} % {pw} % 2) * {tiles} + (({q} / {pw}) / 2) * {tj_n} + ({q} % {pw}) / 2) "
           f"* {f} + i % {f} + 1")
    value = _act(f"element_at(hh, {at}) + element_at(b{k}, i % {f} + 1)", act)
    projections.append([f"transform({seq(ph * pw * f)}, i -> {value}) AS {dst}"])
    u = np.einsum("ia,ocab,jb->ijoc", G, wt, G).reshape(36, f, c)
    weights = {f"u{k}_{x}": u[x].astype(np.float32) for x in range(36)}
    weights[f"b{k}"] = bias.astype(np.float32)
    return Op("winograd", projections, weights, (src,), dst)


def dense_op(k: int, wt: np.ndarray, bias: np.ndarray, act, src: str = "a", dst: str = "a") -> Op:
    act = "relu" if act is True else (act or None)
    value = _act(f"{_dot(src, 'wk')} + bk", act)
    return Op("dense", [[f"zip_with(w{k}, b{k}, (wk, bk) -> {value}) AS {dst}"]],
              {f"w{k}": wt.astype(np.float32), f"b{k}": bias.astype(np.float32)}, (src,), dst)


def pool_op(k: int, layer, shape, out_shape, src: str = "a", dst: str = "a") -> Op:
    c, h, w = shape
    _, oh, ow = out_shape
    kk, s = layer.kernel, layer.stride
    pads = conv_padding(layer, h, w)
    projections, weights, x = [], {}, src
    if any(pads):
        projections.append([_pad_gather(shape, pads, src, "pd", MIN_REAL if layer.kind == "maxpool" else R0)])
        x, h, w = "pd", h + pads[0] + pads[1], w + pads[2] + pads[3]
    q = f"(i / {c})"
    terms = [f"element_at({x}, (({q} / {ow}) * {s} + {dy}) * {w * c} + (({q} % {ow}) * {s} + {dx}) * {c} + i % {c} + 1)"
             for dy in range(kk) for dx in range(kk)]
    if layer.kind == "maxpool":
        value = terms[0] if len(terms) == 1 else f"greatest({', '.join(terms)})"
    elif any(pads):   # divided by the window's cells inside the map, per output pixel (c<k>, HWC)
        counts = pool_counts(layer, shape[1], shape[2])
        weights[f"c{k}"] = np.repeat((1.0 / counts).reshape(-1), c).astype(np.float32)
        value = f"({' + '.join(terms)}) * element_at(c{k}, i + 1)"
    else:
        value = f"({' + '.join(terms)}) / REAL '{float(kk * kk)!r}'"
    projections.append([f"transform({seq(oh * ow * c)}, i -> {value}) AS {dst}"])
    return Op(layer.kind, projections, weights, (src,), dst)


def macs(spec: ModelSpec) -> int:
    """Multiply-adds per image of the direct form (conv2d and dense layers)."""
    total = 0
    for layer, (cin, *_), out in zip(spec.layers, spec.input_shapes(), spec.shapes):
        if layer.kind == "conv2d":
            total += int(np.prod(out)) * cin // (layer.groups or 1) * layer.kernel ** 2
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
    Output rows (rid, a): a = the class probabilities. Each project node carries the image id, the
    weight columns of later steps (and of its own step until its last projection) and the outputs
    of earlier steps that later steps still read (a graph's skip connections and branches)."""
    needed = [list(op.weights) for op in ops]
    pb = tickets(PlanBuilder())
    image_node = pb.new_builder().values([images]).get_plan_node()
    all_weights = [n for names in needed for n in names]
    pb = pb.hash_join(["slot"], ["slot"], image_node, ["rid", "img"] + all_weights)
    for idx, op in enumerate(ops):
        later = [n for names in needed[idx + 1:] for n in names]
        live = list(dict.fromkeys(c for later_op in ops[idx + 1:] for c in later_op.reads
                                  if c != op.out and c in _written(ops[:idx])))
        for j, projection in enumerate(op.projections):
            last = j == len(op.projections) - 1
            carry = ["rid"] + live + (later if last else later + list(op.weights))
            pb = pb.project(carry + projection)
    return pb.project(["rid", f"{ops[-1].out} AS a"]).get_plan_node()


def _written(ops: list[Op]) -> set[str]:
    return {op.out for op in ops}
