"""A NumPy replay of the reduction tree of the chapter-5 CUDA kernels, in float32.

The kernels in ``bn_forward.cu`` and ``bn_backward.cu`` reduce each channel in
four levels (see ``bn_common.cuh``). This module performs the same arithmetic
in the same order, with the same thread-to-element assignment, so that the
tree can be tested on a machine without a GPU:

1. thread t of block g of a channel visits the channel's values
   j = g*B + t + k*G*B, k = 0, 1, ... (ncs) or rows m = g*by + ty + k*G*by (mc),
   folding them in one by one (Welford's update, or plain sums);
2. ncs: the lanes of each warp merge with ``__shfl_down_sync`` at offsets
   16, 8, 4, 2, 1 (a lane whose partner is past lane 31 gets its own value back);
3. ncs: lane 0 of each warp writes to shared memory and warp 0 repeats the warp
   tree over those totals; mc: the 8 thread rows of a block halve in shared
   memory, offsets 4, 2, 1;
4. if G > 1, the last block of the channel lets thread t (row ty) merge the
   block partials t, t + B, ... one by one, and repeats level 2-3 over them.

It differs from the GPU only in the last bits: nvcc contracts ``a * b + c``
into one rounding (FMA) and the Welford step divides with ``__fdividef``.
"""
import numpy as np

from .plan import MC_BLOCK, THREADS, Layout, layout_of, reduction_launch

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


def welford_push(acc, x, valid):
    """Welford's update of every thread's (count, mean, M2) with ``x`` where ``valid``."""
    n, mean, m2 = acc
    n1 = n + 1
    d = (x - mean).astype(F32)
    new_mean = (mean + d / n1.astype(F32)).astype(F32)
    new_m2 = (m2 + d * (x - new_mean)).astype(F32)
    return (np.where(valid, n1, n), np.where(valid, new_mean, mean), np.where(valid, new_m2, m2))


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

def _strided(values, G, B, fill):
    """(..., L) -> (..., K, G, B) with [..., k, g, t] = values[..., k*G*B + g*B + t], and its validity mask."""
    L = values.shape[-1]
    K = max(1, -(-L // (G * B)))
    pad = K * G * B - L
    padded = np.concatenate([values, np.full((*values.shape[:-1], pad), fill, values.dtype)], axis=-1)
    valid = np.arange(K * G * B) < L
    return padded.reshape(*values.shape[:-1], K, G, B), valid.reshape(K, G, B)


def _sequential(step, acc, streams, valid):
    """Fold ``streams`` (each (..., K, G, B)) into ``acc`` over k = 0, 1, ... in order."""
    for k in range(valid.shape[0]):
        acc = step(acc, *(s[..., k, :, :] for s in streams), valid[k])
    return acc


def _grid_merge(partials, combine, identity, block_tree, threads):
    """Level 4: thread t merges partials t, t + threads, ... (over the last axis), then the block tree."""
    lead, G = partials[0].shape[:-1], partials[0].shape[-1]
    K = -(-G // threads)
    acc = identity((*lead, threads))
    for k in range(K):
        chunk = identity((*lead, threads))
        take = min(threads, G - k * threads)
        chunk = tuple(np.concatenate([p[..., k * threads:k * threads + take], e[..., take:]], axis=-1)
                      for p, e in zip(partials, chunk))
        acc = combine(acc, chunk)
    return block_tree(acc)


def _tree_ncs(lay, G, streams, push, combine, identity, fills):
    """Levels 1-4 for an (N, C, S) layout; ``streams`` are (N, C, S) arrays; returns per-channel totals (C,)."""
    B = THREADS
    per_channel = [np.moveaxis(s, 1, 0).reshape(lay.C, -1) for s in streams]        # (C, L), j = n*S + s
    strided = [_strided(v, G, B, f) for v, f in zip(per_channel, fills)]
    valid = strided[0][1]
    acc = _sequential(push, identity((lay.C, G, B)), [s for s, _ in strided], valid)   # level 1
    block = block_reduce_1d(acc, combine, identity)                                     # levels 2-3: (C, G)
    if G == 1:
        return tuple(a[:, 0] for a in block)
    return _grid_merge(block, combine, identity, lambda v: block_reduce_1d(v, combine, identity), B)


def _tree_mc(lay, G, streams, push, combine, identity, fills):
    """Levels 1-4 for an (M, C) layout; ``streams`` are (M, C) arrays; returns per-channel totals (C,)."""
    by = MC_BLOCK[1]
    # rows m = k*G*by + g*by + ty: put the row axis last, stride it, then move channels last again.
    strided = [_strided(np.ascontiguousarray(s.T), G, by, f) for s, f in zip(streams, fills)]   # (C, K, G, by)
    valid = strided[0][1]
    acc = _sequential(push, identity((lay.C, G, by)), [s for s, _ in strided], valid)
    rows_last = tuple(np.moveaxis(a, 0, -1) for a in acc)                               # (G, by, C)
    block = block_reduce_rows(rows_last, combine)                                       # (G, C)
    if G == 1:
        return tuple(a[0] for a in block)
    # thread row ty merges partials g = ty, ty + by, ...: stride the G axis over the by rows
    partials = tuple(np.moveaxis(a, 0, -1) for a in block)                              # (C, G)
    merged = _grid_merge(partials, combine, identity, lambda v: v, by)                  # (C, by), no tree yet
    return block_reduce_rows(tuple(np.moveaxis(a, 0, -1) for a in merged), combine)


def _as_streams(lay, arrays):
    if lay.kind == "ncs":
        return [np.asarray(a, F32).reshape(lay.N, lay.C, lay.S) for a in arrays]
    return [np.asarray(a, F32).reshape(lay.N, lay.C) for a in arrays]


def reduce_moments(x, layout="NCHW", G=None, sm_count=132):
    """Per-channel (count, mean, M2) exactly as ``bn_forward_stats_*`` merges them.

    Args:
        x: float32 array, (N, C, ...) for "NCHW" or (..., C) for "NHWC".
        G: blocks per channel (per 32-channel column for channels-last); by
           default what :func:`bnref.cuda.plan.reduction_launch` picks for a GPU
           with ``sm_count`` SMs.

    Returns:
        count (C,) int64, mean (C,) float32, m2 (C,) float32.
    """
    lay = layout_of(np.shape(x), layout)
    G = G or reduction_launch(lay, sm_count).G

    def push(acc, v, valid):
        return welford_push(acc, v, valid)

    tree = _tree_ncs if lay.kind == "ncs" else _tree_mc
    return tree(lay, G, _as_streams(lay, [x]), push, moments_combine, moments_identity, [F32(0)])


def reduce_backward_sums(dy, x, mean, layout="NCHW", G=None, sm_count=132):
    """Per-channel (sum dy, sum dy * (x - mean)) exactly as ``bn_backward_reduce_*`` merges them."""
    lay = layout_of(np.shape(x), layout)
    G = G or reduction_launch(lay, sm_count).G
    mean_b = np.asarray(mean, F32)[:, None, None]      # level 1 works on (C, G, threads) arrays

    def push(acc, g, v, valid):
        a, b = acc
        a = (a + np.where(valid, g, F32(0))).astype(F32)
        b = (b + np.where(valid, g * (v - mean_b), F32(0))).astype(F32)
        return a, b

    tree = _tree_ncs if lay.kind == "ncs" else _tree_mc
    return tree(lay, G, _as_streams(lay, [dy, x]), push, sums_combine, sums_identity, [F32(0), F32(0)])


def reduce_power_sums(x, layout="NCHW", G=None, sm_count=132):
    """Counter-example: per-channel (sum x, sum x^2) in float32 through the same tree.

    This is what a one-pass kernel computing var = E[x^2] - E[x]^2 would do;
    the chapter shows why it fails when |mean| >> std. No kernel of the package uses it.
    """
    lay = layout_of(np.shape(x), layout)
    G = G or reduction_launch(lay, sm_count).G

    def push(acc, v, valid):
        a, b = acc
        return ((a + np.where(valid, v, F32(0))).astype(F32), (b + np.where(valid, v * v, F32(0))).astype(F32))

    tree = _tree_ncs if lay.kind == "ncs" else _tree_mc
    return tree(lay, G, _as_streams(lay, [x]), push, sums_combine, sums_identity, [F32(0)])


def forward_stats(x, eps=1e-5, layout="NCHW", G=None, sm_count=132):
    """The finalizer of ``bn_forward_stats_*`` on the mirrored tree: (mean, biased var, rstd), float32."""
    n, mean, m2 = reduce_moments(x, layout, G, sm_count)
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
