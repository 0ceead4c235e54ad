"""The CNN's forward pass as one pyvelox plan: named stages of Presto expressions, REAL throughout.

One row per image flows through project nodes; the weights are columns of joined rows (never
literals: a `REAL 'x'` literal costs ~8 us of compiling per task, 0.3 s for conv2's 36,864).
Every dot product is `cast(array_sum(zip_with(a, b, (p, q) -> p * q)) AS real)` (`array_sum` of
REAL returns DOUBLE: the cast keeps the next layer in REAL). Columns per image row (HWC order):

  stage           columns                                       shape per image
  --------------  --------------------------------------------  ------------------------------
  source          rid, img                                      3,072 (CHW, 0..255)
  conv1           c1 = relu(conv1(img / 255))                   900 x 64 (30 x 30 grid)
  winograd_in     v0..v35 = B^T d B of each 6x6 tile            49 tiles x 64, per component
  winograd_dot    m_x = U_x . v_x (64 out x 64 in per tile)     49 * 64 flat, per component
  winograd_out    y = A^T M A, 2x2 max-pool, + bias, ReLU -> h  12,544 in H_ORDER (not HWC)
  fc1             f1 = relu(fc1(h))                             512
  fc2             lg = fc2(f1)                                  10
  softmax         prob                                          10

conv2 + max-pool is Winograd F(4,3): 36 components of 49 tiles x 64 x 64 multiply-adds = 7.2 M
per image instead of 28.9 M; each 4x4 output tile holds four whole 2x2 pooling windows, so the
pool is an element-wise max of the tile's outputs (bias and ReLU commute with it).

fc1 puts its weights on the probe side of a join (B blocks of 512/B neurons; the blocks pass by
reference) with the images' h on the build side, then gathers the (image, block) rows into one
single-driver pipeline (a join probed by the image ids) to assemble f1 with map_agg.

The images enter as the build side of a join whose probe side is a scan over "ticket" rows (slot,
conv weights): each ticket is a split, so the drivers share the images, and the conv weights of
the ticket pass by reference into every image row. Weight layouts below are NumPy reorders and the
Winograd kernel transform U = G g G^T of the weights (never of the data).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

R0 = "REAL '0.0'"
STAGES = ("source", "conv1", "winograd_in", "winograd_dot", "winograd_out", "fc1", "fc2", "softmax")
OUTPUT = {"source": "img", "conv1": "c1", "winograd_in": "v0", "winograd_dot": "m0", "winograd_out": "h",
          "fc1": "f1", "fc2": "lg", "softmax": "prob"}

# Winograd F(4,3) (Lavin & Gray 2016): input transform B^T (6x6), kernel G (6x3), output A^T (4x6).
M_OUT, A_IN = 4, 6
TILES = 7                  # 28 / 4 output tiles per side; tile t = 7 * ti + tj reads c1 rows/cols 4t..4t+5
COMPONENTS = A_IN * A_IN   # 36
BT = np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
               [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]], dtype=np.float64)
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]],
              dtype=np.float64)


def winograd_u(conv2_weight: np.ndarray) -> np.ndarray:
    """conv2.weight (64 out, 64 in, 3, 3) -> U (36 components x = 6 i + j, 64 out, 64 in), float32."""
    u = np.einsum("ia,ocab,jb->ijoc", G, conv2_weight.astype(np.float64), G)
    return u.reshape(COMPONENTS, 64, 64).astype(np.float32)


def h_order() -> np.ndarray:
    """H_ORDER[i] = index in the HWC pooled map (row, column, channel; 14 x 14 x 64) of h[i].

    h is four blocks (pooling phase pa, pb of each 4x4 tile), each 49 tiles x 64 channels:
    i = ((2 pa + pb) * 49 + 7 ti + tj) * 64 + o  <->  pooled pixel (2 ti + pa, 2 tj + pb), channel o.
    """
    pa, pb, ti, tj, o = np.meshgrid(np.arange(2), np.arange(2), np.arange(TILES), np.arange(TILES), np.arange(64),
                                    indexing="ij")
    return (((2 * ti + pa) * 14 + (2 * tj + pb)) * 64 + o).reshape(-1)


H_ORDER = h_order()


# --- weight tables (one Arrow record batch each) ------------------------------------------------

@dataclass(frozen=True)
class WeightArrays:
    """The weights laid out as the plan reads them (float32), shapes documented per field."""
    w1: np.ndarray        # (64, 28): conv1 filters in patch order (channel, dy, dx), then the bias
    u: np.ndarray         # (36, 64, 64): Winograd U per component, (out, in)
    b2: np.ndarray        # (12544,): conv2 bias per element of h (channel fastest)
    fc1: np.ndarray       # (512, 12544): fc1 weights with columns in H_ORDER
    fc1_bias: np.ndarray  # (512,)
    fc2: np.ndarray       # (10, 512)
    fc2_bias: np.ndarray  # (10,)


def weight_arrays(weights) -> WeightArrays:
    f32 = np.float32
    fc1_hwc = weights["fc1.weight"].reshape(512, 64, 14, 14).transpose(0, 2, 3, 1).reshape(512, 12544)
    return WeightArrays(
        w1=np.concatenate([weights["conv1.weight"].reshape(64, 27), weights["conv1.bias"][:, None]], 1).astype(f32),
        u=winograd_u(weights["conv2.weight"]),
        b2=np.tile(np.asarray(weights["conv2.bias"], f32), 196),
        fc1=np.ascontiguousarray(fc1_hwc[:, H_ORDER], f32),
        fc1_bias=np.asarray(weights["fc1.bias"], f32),
        fc2=np.ascontiguousarray(weights["fc2.weight"], f32),
        fc2_bias=np.asarray(weights["fc2.bias"], f32))


def list_array(pa, mat: np.ndarray):
    """(n, L) -> Arrow list<float> of n rows; (n, a, L) -> list<list<float>>; and so on."""
    mat = np.ascontiguousarray(mat, dtype=np.float32)
    if mat.ndim >= 3:
        n, a = mat.shape[:2]
        inner = list_array(pa, mat.reshape(n * a, *mat.shape[2:]))
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * a), inner)
    n, length = mat.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * length), pa.array(mat.ravel()))


CONV_WEIGHTS = ["w1", "b1"] + [f"u{x}" for x in range(COMPONENTS)] + ["b2"]


def ticket_batch(pa, w: WeightArrays, slot: int):
    """One ticket row: slot (BIGINT) and the conv weights (w1 64 x 27, b1 64, u0..u35 64 x 64, b2 12544)."""
    cols = {"slot": pa.array([slot], pa.int64()), "w1": list_array(pa, w.w1[None, :, :27]),
            "b1": list_array(pa, w.w1[None, :, 27])}
    for x in range(COMPONENTS):
        cols[f"u{x}"] = list_array(pa, w.u[x:x + 1])
    cols["b2"] = list_array(pa, w.b2[None])
    return pa.record_batch(cols)


def fc1_block_batches(pa, w: WeightArrays, blocks: int) -> list:
    """`blocks` rows: blk (INTEGER), wb ((512/blocks) x 12544 neurons' weights), fbb (their biases), k = 0."""
    nb = 512 // blocks
    wb = w.fc1.reshape(blocks, nb, 12544)
    fb = w.fc1_bias.reshape(blocks, nb)
    return [pa.record_batch({"blk": pa.array([i], pa.int32()), "wb": list_array(pa, wb[i:i + 1]),
                             "fbb": list_array(pa, fb[i:i + 1]), "k": pa.array([0], pa.int64())})
            for i in range(blocks)]


def fc2_batch(pa, w: WeightArrays):
    return pa.record_batch({"k2": pa.array([0], pa.int64()), "w3": list_array(pa, w.fc2[None]),
                            "b3": list_array(pa, w.fc2_bias[None])})


def image_batch(pa, images: np.ndarray, slots: int):
    """uint8 (n, 3, 32, 32) -> rows rid (0..n-1), slot (rid % slots), img (3,072 REAL, CHW, unscaled)."""
    n = len(images)
    rid = np.arange(n, dtype=np.int64)
    return pa.record_batch({"rid": pa.array(rid), "slot": pa.array(rid % slots),
                            "img": list_array(pa, images.reshape(n, -1).astype(np.float32))})


def schema_of(vt, batch) -> object:
    """The pyvelox ROW type of an Arrow record batch (BIGINT, INTEGER, REAL, nested arrays of REAL)."""
    import pyarrow as pa

    def vtype(t):
        if pa.types.is_list(t):
            return vt.ARRAY(vtype(t.value_type))
        if pa.types.is_struct(t):
            return vt.ROW([f.name for f in t], [vtype(f.type) for f in t])
        return {pa.int64(): vt.BIGINT, pa.int32(): vt.INTEGER, pa.float32(): vt.REAL}[t]()
    return vt.ROW([f.name for f in batch.schema], [vtype(f.type) for f in batch.schema])


# --- expressions, stage by stage ----------------------------------------------------------------

def _coef(c: float, var: str, first: bool) -> str:
    """`var` times the constant c (an exact small Winograd coefficient), as the next term of a sum."""
    if c == 1:
        return var if first else f" + {var}"
    if c == -1:
        return f"negate({var})" if first else f" - {var}"
    if first:
        return f"REAL '{c!r}' * {var}"
    return f" + REAL '{c!r}' * {var}" if c > 0 else f" - REAL '{-c!r}' * {var}"


def lincomb(terms: list[tuple[float, str]]) -> str:
    """sum_k c_k * a_k element-wise over equally long arrays a_k, as a chain of zip_with."""
    terms = [(float(c), e) for c, e in terms if c != 0]
    c0, e0 = terms[0]
    if len(terms) == 1:
        return e0 if c0 == 1 else f"transform({e0}, p -> {_coef(c0, 'p', True)})"
    c1, e1 = terms[1]
    expr = f"zip_with({e0}, {e1}, (p, q) -> {_coef(c0, 'p', True)}{_coef(c1, 'q', False)})"
    for c, e in terms[2:]:
        expr = f"zip_with({expr}, {e}, (p, q) -> p{_coef(c, 'q', False)})"
    return expr


def dot(a: str, b: str) -> str:
    return f"cast(array_sum(zip_with({a}, {b}, (p, q) -> p * q)) AS real)"


def conv1_projections(carry: list[str]) -> list[list[str]]:
    """img (CHW) -> c1 (900 x 64). Patches p1 (900 arrays of 27, (channel, dy, dx) order) times the
    filters w1 (64 arrays of 27) plus b1, each a 27-term dot, ReLU. Measured against the former
    form (patches and filters as ROW(c1..c27) fields, one 27-term expression): 12.1 against 23.7 ms
    of operator CPU per image (1 driver, medians of 3 interleaved profiles, 16 images, load 5.5)."""
    fields = ", ".join(f"element_at(x, {c * 1024 + dy * 32 + dx} + (q / 30) * 32 + q % 30 + 1)"
                       for c in range(3) for dy in range(3) for dx in range(3))
    return [
        carry + ["transform(img, v -> v / REAL '255.0') AS x", "w1", "b1"],
        carry + [f"transform(sequence(0, 899), q -> ARRAY[{fields}]) AS p1", "w1", "b1"],
        carry + [f"transform(p1, p -> zip_with(w1, b1, (wk, b) -> greatest({dot('p', 'wk')} + b, {R0}))) AS c1"],
    ]


def winograd_in_projections(carry: list[str]) -> list[list[str]]:
    """c1 -> z0..z5 (row transform, 7 tile rows x 30 columns, x 64) -> v0..v35 (49 tiles x 64)."""
    z = []
    for i in range(A_IN):
        terms = [(BT[i, r], f"element_at(c1, ({M_OUT} * (r / 30) + {r}) * 30 + r % 30 + 1)") for r in range(A_IN)]
        z.append(f"transform(sequence(0, {TILES * 30 - 1}), r -> {lincomb(terms)}) AS z{i}")
    v = []
    for i in range(A_IN):
        for j in range(A_IN):
            terms = [(BT[j, c], f"element_at(z{i}, (t / {TILES}) * 30 + {M_OUT} * (t % {TILES}) + {c + 1})")
                     for c in range(A_IN)]
            v.append(f"transform(sequence(0, {TILES * TILES - 1}), t -> {lincomb(terms)}) AS v{A_IN * i + j}")
    return [carry + z, carry + v]


def winograd_dot_projections(carry: list[str]) -> list[list[str]]:
    """m_x[t * 64 + o] = sum_c U_x[o, c] * v_x[t][c]: 49 x 64 dots of length 64 per component."""
    return [carry + [f"flatten(transform(v{x}, vv -> transform(u{x}, uu -> {dot('vv', 'uu')}))) AS m{x}"
                     for x in range(COMPONENTS)]]


def winograd_out_projections(carry: list[str]) -> list[list[str]]:
    """m -> s (A^T along columns) -> y (4x4 outputs per tile) -> h = relu(maxpool(y) + b2), H_ORDER."""
    s = [f"{lincomb([(AT[b, j], f'm{A_IN * i + j}') for j in range(A_IN)])} AS s{i}_{b}"
         for i in range(A_IN) for b in range(M_OUT)]
    y = [f"{lincomb([(AT[a, i], f's{i}_{b}') for i in range(A_IN)])} AS y{a}_{b}"
         for a in range(M_OUT) for b in range(M_OUT)]
    mx = "(p, q) -> greatest(p, q)"
    pools = [f"zip_with(zip_with(y{2 * pa}_{2 * pb}, y{2 * pa}_{2 * pb + 1}, {mx}), "
             f"zip_with(y{2 * pa + 1}_{2 * pb}, y{2 * pa + 1}_{2 * pb + 1}, {mx}), {mx})" for pa in range(2) for pb in range(2)]
    h = f"zip_with(concat({', '.join(pools)}), b2, (p, b) -> greatest(p + b, {R0})) AS h"
    return [carry + ["b2"] + s, carry + ["b2"] + y, carry + [h]]  # carry must not hold b2


FC1_DOTS = f"zip_with(wb, fbb, (wo, b) -> greatest({dot('wo', 'h')} + b, {R0})) AS y"
FC2 = "zip_with(w3, b3, (wk, b) -> cast(array_sum(zip_with(f1, wk, (p, q) -> p * q)) AS real) + b) AS lg"
SOFTMAX = ["transform(lg, v -> exp(v - array_max(lg))) AS e", "transform(e, v -> v / array_sum(e)) AS prob"]


# --- the plan -------------------------------------------------------------------------------------

Source = Callable[[object], object]  # PlanBuilder -> PlanBuilder with a source node added


@dataclass(frozen=True)
class PlanInputs:
    """Everything a forward plan reads. `tickets` and `fc1_blocks` add a source (a table scan over
    files, or a values node) to a fresh builder; the others are Velox vectors of one batch each."""
    tickets: Source      # rows: slot BIGINT + CONV_WEIGHTS columns
    images: object       # image_batch(): rid, slot, img
    rids: object         # one column qid BIGINT: the image ids 0..n-1
    fc1_blocks: Source   # rows of fc1_block_batches()
    fc2: object          # fc2_batch()
    blocks: int          # number of fc1 blocks


def forward_plan(PlanBuilder, inputs: PlanInputs, until: str = "softmax"):
    """The plan node of the forward pass; its output is (rid, <OUTPUT[until]>), one row per image."""
    if until not in STAGES:
        raise ValueError(f"unknown stage {until!r}")
    stop = STAGES.index(until)
    us = [f"u{x}" for x in range(COMPONENTS)]
    pb = inputs.tickets(PlanBuilder())
    images = pb.new_builder().values([inputs.images]).get_plan_node()
    pb = pb.hash_join(["slot"], ["slot"], images, ["rid", "img"] + CONV_WEIGHTS)
    steps = [("conv1", conv1_projections(["rid"] + us + ["b2"])),
             ("winograd_in", winograd_in_projections(["rid"] + us + ["b2"])),
             ("winograd_dot", winograd_dot_projections(["rid", "b2"])),
             ("winograd_out", winograd_out_projections(["rid"]))]
    for name, projections in steps:
        if STAGES.index(name) > stop:
            break
        for projection in projections:
            pb = pb.project(projection)
    if stop <= STAGES.index("winograd_out"):
        return pb.project(["rid", OUTPUT[until]]).get_plan_node()
    conv = pb.project(["rid", "h", "0 AS k"]).get_plan_node()
    pb = inputs.fc1_blocks(pb.new_builder()).hash_join(["k"], ["k"], conv, ["blk", "wb", "fbb", "rid", "h"])
    parts = pb.project(["rid", "blk", FC1_DOTS]).get_plan_node()
    # Gather: a join's build side collects the (image, block) rows of every driver; probed by a
    # single-driver values node of the ids, the per-image aggregation below sees whole groups.
    pb = pb.new_builder().values([inputs.rids]).hash_join(["qid"], ["rid"], parts, ["rid", "blk", "y"])
    pb = pb.aggregate(["rid"], ["map_agg(blk, y) AS m"])
    pb = pb.project(["rid", f"flatten(transform(sequence(0, {inputs.blocks - 1}), "
                            "i -> element_at(m, cast(i AS integer)))) AS f1", "0 AS k"])
    if until == "fc1":
        return pb.project(["rid", "f1"]).get_plan_node()
    pb = pb.hash_join(["k"], ["k2"], pb.new_builder().values([inputs.fc2]).get_plan_node(), ["rid", "f1", "w3", "b3"])
    pb = pb.project(["rid", FC2])
    if until == "fc2":
        return pb.get_plan_node()
    return pb.project(["rid", SOFTMAX[0]]).project(["rid", SOFTMAX[1]]).get_plan_node()


# Which stage a project node belongs to, by the first column it computes (for per-stage profiles).
STAGE_OF_COLUMN = {"x": "conv1", "p1": "conv1", "c1": "conv1", "z0": "winograd_in", "v0": "winograd_in",
                   "m0": "winograd_dot", "s0_0": "winograd_out", "y0_0": "winograd_out", "h": "winograd_out",
                   "y": "fc1", "f1": "fc1", "lg": "fc2", "e": "softmax", "prob": "softmax"}
