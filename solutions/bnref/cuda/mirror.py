"""A NumPy replay of the reduction tree of the chapter-5 CUDA kernels, in float32.

The kernels in ``bn_forward.cu`` and ``bn_backward.cu`` run a persistent grid and reduce each channel in
four levels (see ``bn_common.cuh``). This module performs the same arithmetic in the same order, with the
same split of the work into blocks (:func:`bnref.cuda.plan.segments`) and the same thread-to-element
assignment, so that the tree can be tested on a machine without a GPU:

1. block b's share of the units is cut into segments, one per channel (ncs) or column of bx floats or
   float4s (mc); in a segment of elements [lo, hi), thread t visits j = lo + t + k*B (ncs; with float4s, the
   4 values of each in order) or thread row ty the rows m = lo + ty + k*by (mc), and folds them in a step
   of U elements (``plan.LOAD_BYTES`` of loads) at a time while whole steps remain, then one by one:
   Welford's update with all the values of the step at once (their own mean and M2, merged by Chan's
   formula), or plain sums value by value;
2. ncs: the lanes of each warp merge with ``__shfl_down_sync`` at offsets
   16, 8, 4, 2, 1 (a lane whose partner is past lane 31 gets its own value back);
3. ncs: lane 0 of each warp writes to shared memory and warp 0 repeats the warp
   tree over those totals; mc: the by thread rows of a block halve in shared
   memory, offsets by/2, ..., 1; either gives one partial per segment;
4. if several blocks share a group, its partials merge in slot order in runs of ``plan.FANIN``: the last
   block of a run lets thread t (row ty) merge the run's partials t, t + B, ... and repeats level 2-3 over
   them; with several runs, the last run's block merges the runs' results the same way.

It differs from the GPU only in the last bits: nvcc contracts ``a * b + c``
into one rounding (FMA) and the Welford step divides with ``__fdividef``.
"""
import numpy as np

from .plan import CHUNK, FANIN, LOAD_BYTES, THREADS, Layout, layout_of, reduction_launch, resident_blocks, \
    segments, vector_width

WARP = 32
F32 = np.float32


# --- the two monoids: a value is a tuple of equally shaped arrays -------------

def moments_identity(shape):
    """Empty (count, mean, M2)."""
    return (np.zeros(shape, np.int64), np.zeros(shape, F32), np.zeros(shape, F32))


def moments_combine(a, b):
    """Chan's merge, as ``combine(Moments, Moments)`` in bn_common.cuh."""
    na, ma, qa = a
    nb, mb, qb = b
    n = na + nb
    with np.errstate(invalid="ignore", divide="ignore"):
        fb = np.where(n > 0, nb.astype(F32) / n.astype(F32), F32(0)).astype(F32)
    d = (mb - ma).astype(F32)
    mean = (ma + d * fb).astype(F32)
    m2 = (qa + qb + d * d * na.astype(F32) * fb).astype(F32)
    return n, mean, m2


def welford_push(acc, xs):
    """Welford's update of every thread's (count, mean, M2) with the K values ``xs`` at once, as
    ``welford_push`` in bn_common.cuh: their own mean and M2 in two passes, merged by Chan's formula."""
    n, mean, m2 = acc
    K = len(xs)
    fb, na = (F32(K) / (n + K).astype(F32)).astype(F32), n.astype(F32)
    total = xs[0]
    for x in xs[1:]:
        total = (total + x).astype(F32)
    mb = (total * F32(1.0 / K)).astype(F32)
    m2b = np.zeros_like(mb)
    for x in xs:
        d = (x - mb).astype(F32)
        m2b = (m2b + d * d).astype(F32)
    d = (mb - mean).astype(F32)
    return n + K, (mean + d * fb).astype(F32), (m2 + (m2b + d * d * na * fb)).astype(F32)


def sums_identity(shape):
    """Empty (sum dy, sum dy * (x - mean))."""
    return (np.zeros(shape, F32), np.zeros(shape, F32))


def sums_combine(a, b):
    return tuple((u + v).astype(F32) for u, v in zip(a, b))


# --- levels 2 and 3 ------------------------------------------------------------

def shfl_down(value, offset):
    """``__shfl_down_sync`` along the last axis (32 lanes): lane i reads lane i + offset, or itself."""
    def one(arr):
        out = arr.copy()
        out[..., :WARP - offset] = arr[..., offset:]
        return out
    return tuple(one(a) for a in value)


def warp_reduce(value, combine):
    """The warp tree over the last axis (32 lanes); returns lane 0's result (that axis dropped)."""
    offset = WARP // 2
    while offset > 0:
        value = combine(value, shfl_down(value, offset))
        offset //= 2
    return tuple(a[..., 0] for a in value)


def block_reduce_1d(value, combine, identity):
    """``block_reduce_1d``: value arrays (..., B) with B a multiple of 32; returns (...)."""
    lead, threads = value[0].shape[:-1], value[0].shape[-1]
    warps = threads // WARP
    per_warp = warp_reduce(tuple(a.reshape(*lead, warps, WARP) for a in value), combine)   # (..., warps)
    lanes = identity((*lead, WARP))
    lanes = tuple(np.concatenate([w, e[..., warps:]], axis=-1) for w, e in zip(per_warp, lanes))
    return warp_reduce(lanes, combine)


def block_reduce_rows(value, combine):
    """``block_reduce_rows``: value arrays (..., by, C) with by a power of two; returns (..., C)."""
    value = tuple(a.copy() for a in value)
    offset = value[0].shape[-2] // 2
    while offset > 0:
        merged = combine(tuple(a[..., :offset, :] for a in value), tuple(a[..., offset:2 * offset, :] for a in value))
        for a, m in zip(value, merged):
            a[..., :offset, :] = m
        offset //= 2
    return tuple(a[..., 0, :] for a in value)


# --- level 1 and 4 -------------------------------------------------------------

def _select(mask, new, old):
    """``new`` where ``mask``, else ``old`` (tuples of arrays, as the kernels' conditional updates)."""
    return tuple(np.where(mask, a, b) for a, b in zip(new, old))


def _segment_arrays(launch):
    """The segments of ``launch`` as arrays: group, lo, hi (units), in slot order."""
    segs = np.array([s[1:] for s in segments(launch)], np.int64).reshape(-1, 3)
    return segs[:, 0], segs[:, 1], segs[:, 2]


def _fold(push, acc, streams, valid, channel, step):
    """Level 1. A thread's visits k are axis 1 of ``valid`` (nseg, K, threads...) and of each stream (nseg, K,
    threads..., vec); while a whole ``step`` of them is valid it pushes them at once, then one by one:
    push(acc, values, channel) gets them in the kernels' order (visit, then component), each value a tuple of
    one array per stream."""
    K, vec = valid.shape[1], streams[0].shape[-1]

    def values(ks):
        return [tuple(s[:, k, ..., lane] for s in streams) for k in ks for lane in range(vec)]

    for g in range(0, K, step):
        ks = range(g, min(K, g + step))
        full = valid[:, g + step - 1] if 1 < step and g + step <= K else np.zeros_like(valid[:, 0])
        acc = _select(full, push(acc, values(ks), channel), acc) if full.any() else acc
        for k in ks:
            one = valid[:, k] & ~full
            acc = _select(one, push(acc, values([k]), channel), acc) if one.any() else acc
    return acc


def _gather(partial, first, size, combine, identity, rows):
    """Row r's merge, in order, of partials first + r, first + r + rows, ... < first + size, for each (first,
    size): ``gather`` in bn_common.cuh. Returns arrays (len(first), rows, ...)."""
    t = np.arange(rows)
    lanes = partial[0].shape[1:]
    acc = identity((len(first), rows, *lanes))
    for r in range(-(-int(size.max()) // rows)):
        k = r * rows + t                                                         # (rows,)
        has = k[None, :] < size[:, None]                                         # (n, rows)
        slot = np.where(has, first[:, None] + k[None, :], 0)
        mask = has.reshape(*has.shape, *(1,) * len(lanes))
        acc = _select(mask, combine(acc, tuple(p[slot] for p in partial)), acc)
    return acc


def _merge_groups(partial, group, groups, combine, identity, block_tree, rows):
    """Level 4: the per-group totals (groups, ...) of the segments' partials (nseg, ...), ordered by slot, as
    ``merge_blocks`` in bn_common.cuh. A group with one segment keeps its partial. Otherwise its partials
    merge in runs of FANIN (``_gather``, then ``block_tree`` over the rows), and with several runs, the runs'
    results merge the same way."""
    count = np.bincount(group, minlength=groups)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    runs = -(-count // FANIN)
    run_group = np.repeat(np.arange(groups), runs)
    run_start = np.cumsum(runs) - runs                                           # each group's first run
    k = (np.arange(len(run_group)) - run_start[run_group]) * FANIN               # the run's first partial
    per_run = block_tree(_gather(partial, first[run_group] + k, np.minimum(FANIN, count[run_group] - k), combine,
                                 identity, rows))
    totals = block_tree(_gather(per_run, run_start, runs, combine, identity, rows))
    lanes = (1,) * (partial[0].ndim - 1)
    one_run = _select((runs == 1).reshape(-1, *lanes), tuple(p[run_start] for p in per_run), totals)
    return _select((count == 1).reshape(-1, *lanes), tuple(p[first] for p in partial), one_run)


def _tree_ncs(lay, vec, launch, streams, push, combine, identity):
    """Levels 1-4 for an (N, C, S) layout; ``streams`` are (N, C, S) arrays; returns per-channel totals (C,)."""
    B, L = THREADS, lay.N * (lay.S // vec)                                          # threads, elements per channel
    per_channel = [np.moveaxis(s, 1, 0).reshape(lay.C, L, vec) for s in streams]    # element j of channel c
    group, lo, hi = _segment_arrays(launch)
    lo, hi = lo * CHUNK, np.minimum(hi * CHUNK, L)
    K = max(1, -(-int((hi - lo).max()) // B))
    j = lo[:, None, None] + B * np.arange(K)[None, :, None] + np.arange(B)[None, None, :]   # (nseg, K, B)
    valid = j < hi[:, None, None]
    values = [v[group[:, None, None], np.where(valid, j, 0)] for v in per_channel]          # (nseg, K, B, vec)
    step = LOAD_BYTES // (4 * vec * len(streams))
    acc = _fold(push, identity((len(group), B)), values, valid, group[:, None], step)      # level 1
    partial = block_reduce_1d(acc, combine, identity)                                        # levels 2-3: (nseg,)
    return _merge_groups(partial, group, lay.C, combine, identity,
                         lambda v: block_reduce_1d(v, combine, identity), B)


def _tree_mc(lay, vec, launch, streams, push, combine, identity):
    """Levels 1-4 for an (M, C) layout; ``streams`` are (M, C) arrays; returns per-channel totals (C,). Lane tx
    of a column holds ``vec`` channels (its float or float4): column j of a group is channel group * bx * vec
    + j."""
    bx, by = launch.block[:2]
    width, columns = bx * vec, launch.groups
    pad = columns * width - lay.C                                # channels of the last column's idle lanes
    per_column = [np.pad(s, ((0, 0), (0, pad))).reshape(lay.N, columns, width).transpose(1, 0, 2)[..., None]
                  for s in streams]                              # (columns, M, width, 1): row m, channel j
    group, lo, hi = _segment_arrays(launch)
    K = max(1, -(-int((hi - lo).max()) // by))
    rows = lo[:, None, None] + by * np.arange(K)[None, :, None] + np.arange(by)[None, None, :]   # (nseg, K, by)
    channel = group[:, None, None] * width + np.arange(width)                                    # (nseg, 1, width)
    valid = (rows < hi[:, None, None])[..., None] & (channel < lay.C)[:, None]                   # (nseg, K, by, width)
    values = [v[group[:, None, None], np.where(rows < hi[:, None, None], rows, 0)] for v in per_column]
    step = LOAD_BYTES // (4 * vec * len(streams))
    acc = _fold(push, identity((len(group), by, width)), values, valid, np.minimum(channel, lay.C - 1), step)
    partial = block_reduce_rows(acc, combine)                                                    # (nseg, width)
    totals = _merge_groups(partial, group, columns, combine, identity, lambda v: block_reduce_rows(v, combine), by)
    return tuple(a.reshape(-1)[:lay.C] for a in totals)


def _tree(x_like, layout, kernel, streams, push, combine, identity, blocks, slots, vec):
    """The per-channel totals of ``streams`` (arrays shaped like ``x_like``) through the tree of ``kernel``
    ("bn_forward_stats" or "bn_backward_reduce"), planned as the wrappers plan it."""
    lay = layout_of(np.shape(x_like), layout)
    if vec is None:
        vec = vector_width(lay, aligned=True)
    name = f"{kernel}_{lay.kind}" + ("_vec4" if vec == 4 else "")
    launch = reduction_launch(lay, vec, slots or resident_blocks(name), blocks)
    if lay.kind == "ncs":
        arrays = [np.asarray(a, F32).reshape(lay.N, lay.C, lay.S) for a in streams]
        return _tree_ncs(lay, vec, launch, arrays, push, combine, identity)
    arrays = [np.asarray(a, F32).reshape(lay.N, lay.C) for a in streams]
    return _tree_mc(lay, vec, launch, arrays, push, combine, identity)


def reduce_moments(x, layout="NCHW", blocks=None, slots=None, vec=None):
    """Per-channel (count, mean, M2) exactly as ``bn_forward_stats_*`` merges them.

    Args:
        x: float32 array, (N, C, ...) for "NCHW" or (..., C) for "NHWC".
        blocks: the number of blocks of the grid; by default what :func:`bnref.cuda.plan.reduction_launch`
            picks for ``slots`` resident blocks (by default those of an H200, from the committed ptxas report).
        vec: 4 to replay a ``_vec4`` kernel (float4 loads), 1 a scalar one; by default what the wrapper
            runs for 16-byte aligned arrays.

    Returns:
        count (C,) int64, mean (C,) float32, m2 (C,) float32.
    """
    def push(acc, values, channel):
        return welford_push(acc, [v for (v,) in values])

    return _tree(x, layout, "bn_forward_stats", [x], push, moments_combine, moments_identity, blocks, slots, vec)


def reduce_backward_sums(dy, x, mean, layout="NCHW", blocks=None, slots=None, vec=None):
    """Per-channel (sum dy, sum dy * (x - mean)) exactly as ``bn_backward_reduce_*`` merges them."""
    mean = np.asarray(mean, F32)

    def push(acc, values, channel):
        a, b = acc
        for g, v in values:
            a, b = (a + g).astype(F32), (b + g * (v - mean[channel])).astype(F32)
        return a, b

    return _tree(x, layout, "bn_backward_reduce", [dy, x], push, sums_combine, sums_identity, blocks, slots, vec)


def reduce_power_sums(x, layout="NCHW", blocks=None, slots=None, vec=None):
    """Counter-example: per-channel (sum x, sum x^2) in float32 through the tree of the forward statistics.

    This is what a one-pass kernel computing var = E[x^2] - E[x]^2 would do;
    the chapter shows why it fails when |mean| >> std. No kernel of the package uses it.
    """
    def push(acc, values, channel):
        a, b = acc
        for (v,) in values:
            a, b = (a + v).astype(F32), (b + v * v).astype(F32)
        return a, b

    return _tree(x, layout, "bn_forward_stats", [x], push, sums_combine, sums_identity, blocks, slots, vec)


def forward_stats(x, eps=1e-5, layout="NCHW", blocks=None, slots=None, vec=None):
    """The finalizer of ``bn_forward_stats_*`` on the mirrored tree: (mean, biased var, rstd), float32."""
    n, mean, m2 = reduce_moments(x, layout, blocks, slots, vec)
    var = (m2 / n.astype(F32)).astype(F32)
    return mean, var, (F32(1) / np.sqrt(var + F32(eps))).astype(F32)


def walk_offsets(N, C, S, c, j, stride, steps):
    """``ChannelWalk`` of bn_common.cuh in Python: the offsets of elements j, j + stride, ... of channel c."""
    CS = C * S
    n, s = divmod(j, S)
    offset = n * CS + c * S + s
    dn, step_s = divmod(stride, S)
    step_offset, wrap = dn * CS + step_s, CS - S
    out = []
    for _ in range(steps):
        out.append(offset)
        offset += step_offset
        s += step_s
        if s >= S:
            s -= S
            offset += wrap
    return out


__all__ = ["reduce_moments", "reduce_backward_sums", "reduce_power_sums", "forward_stats", "walk_offsets", "Layout"]
