"""Launch shapes of the chapter-5 kernels: pure Python, shared by the CuPy wrappers, the NumPy mirror and the page.

Every kernel but the simple ``bn_channel_moments_ncs`` runs a *persistent grid* (see ``bn_common.cuh``): P
blocks, at most as many as the GPU holds at once (its ``slots``: SMs x resident blocks per SM of that kernel),
so that no block waits for a second, partial wave. The work is T units, numbered group by group, and block b
owns units [b T // P, (b + 1) T // P): the blocks' shares differ by at most one unit.

=================  ===========================================  =================================
kernels            unit                                         group
=================  ===========================================  =================================
``*_stats_ncs``,   ``CHUNK`` consecutive values (or float4s)    a channel
``*_reduce_ncs``   of one channel
``*_mc``           one row of a column of ``bx`` floats         a column of channels
(all mc kernels)   (or ``bx`` float4s, 4 channels each, _vec4)
``bn_affine_ncs``, ``CHUNK`` consecutive values (or float4s)    the whole tensor (one group)
``*_dx_ncs``       of the flat tensor
=================  ===========================================  =================================

Resident blocks per SM come from the kernel itself: on a GPU the wrappers ask the driver (CuPy's occupancy
API); without one, :func:`blocks_per_sm` computes it from the registers and shared memory ptxas reports,
committed in ``ptxas_report.py`` by ``python -m bnref.cuda.nvcc --write``. Nothing here has been timed on
hardware.
"""
import math
from typing import NamedTuple

from . import ptxas_report

THREADS = 256           # threads per block, every kernel (BN_THREADS of bn_common.cuh)
CHUNK = 32              # ncs unit: 32 values or float4s, one warp's load (BN_CHUNK)
LOAD_BYTES = 32         # bytes a thread loads per step before using any of them (BN_LOAD_BYTES)
FANIN = 32              # partials one block merges at most at the grid level (BN_FANIN): two levels above that
MC_WIDEST = 32          # channels-last reductions: at most 32 floats or float4s per row of a block
MIN_PER_THREAD = 16     # a reduction uses fewer blocks rather than give a thread fewer values than this
MAX_PER_CHANNEL = 2**31 - 2**10   # values per channel: the kernels count them in 32 bits, one step past the end


class SMLimits(NamedTuple):
    """What one streaming multiprocessor holds at once (CUDA C Programming Guide, compute capabilities)."""

    threads: int          # resident threads
    blocks: int           # resident blocks
    registers: int        # 32-bit registers
    shared: int           # shared memory for blocks, bytes
    reserved_shared: int  # shared memory the system takes per block, bytes


SM_LIMITS = {
    "sm_75": SMLimits(1024, 16, 65536, 65536, 0),        # Turing: T4
    "sm_80": SMLimits(2048, 32, 65536, 167936, 1024),    # A100
    "sm_90": SMLimits(2048, 32, 65536, 233472, 1024),    # H100, H200
}
#: name -> (architecture, SMs): the GPUs the page and the tests plan for
GPUS = {"H200": ("sm_90", 132), "A100": ("sm_80", 108), "T4": ("sm_75", 40)}


def blocks_per_sm(registers, shared, arch, threads=THREADS):
    """Resident blocks per SM of a kernel with ``registers`` per thread and ``shared`` bytes of static shared
    memory per block, on ``arch``: CUDA's occupancy rule (registers are allocated per warp, 256 at a time)."""
    sm = SM_LIMITS[arch]
    warps = -(-threads // 32)
    per_warp = max(1, -(-registers * 32 // 256)) * 256
    by_shared = sm.shared // (shared + sm.reserved_shared) if shared + sm.reserved_shared else sm.blocks
    return min(sm.blocks, sm.threads // threads, sm.registers // per_warp // warps, by_shared)


def ptxas_table():
    """The committed ptxas report: {(kernel, arch): row}, each row a dict of ``ptxas_report.FIELDS``
    (``registers``, ``smem``, the spills)."""
    return {row[:2]: dict(zip(ptxas_report.FIELDS, row)) for row in ptxas_report.ROWS}


def resident_blocks(kernel, gpu="H200"):
    """Blocks of ``kernel`` that a whole ``gpu`` (a key of :data:`GPUS`) holds at once, from the ptxas report."""
    arch, sms = GPUS[gpu]
    row = ptxas_table()[(kernel, arch)]
    return sms * blocks_per_sm(row["registers"], row["smem"], arch)


class Layout(NamedTuple):
    """How a tensor is walked: ``kind`` "ncs" (N, C, S) with S = H*W, or "mc" (M, C) channels last."""

    kind: str
    N: int  # ncs: batch; mc: rows M
    C: int
    S: int  # ncs: values per (sample, channel); mc: 1

    @property
    def per_channel(self):
        """How many values each channel's statistics run over."""
        return self.N * self.S


def layout_of(shape, layout="NCHW"):
    """The :class:`Layout` of a tensor of ``shape``.

    ``layout="NCHW"``: channels on axis 1, (N, C) or (N, C, *spatial). A 2-D
    (N, C) batch (or one whose spatial size is 1) is walked as channels-last rows. ``layout="NHWC"``: channels
    on the last axis, (*, C).
    """
    shape = tuple(int(s) for s in shape)
    if layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'NCHW' or 'NHWC'; got {layout!r}")
    if len(shape) < 2:
        raise ValueError(f"x must have shape (N, C, ...) (NCHW) or (..., C) (NHWC); got an array of shape {shape}")
    if layout == "NHWC":
        return Layout("mc", math.prod(shape[:-1]), shape[-1], 1)
    if math.prod(shape[2:]) == 1:  # (N, C) or (N, C, 1, 1): the same memory as (N, C) rows
        return Layout("mc", shape[0], shape[1], 1)
    return Layout("ncs", shape[0], shape[1], math.prod(shape[2:]))


def vector_width(lay, aligned):
    """4 when every row is a whole number of float4s and the arrays are 16-byte aligned, else 1."""
    row = lay.S if lay.kind == "ncs" else lay.C
    return 4 if aligned and row % 4 == 0 else 1


class Launch(NamedTuple):
    """A persistent grid: ``grid[0]`` blocks share ``units`` units, numbered group by group, ``per_group`` each."""

    grid: tuple
    block: tuple
    units: int
    per_group: int

    @property
    def blocks(self):
        return self.grid[0]

    @property
    def groups(self):
        return self.units // self.per_group

    @property
    def partial_slots(self):
        """Slots of the reductions' workspace: block b's partial of group g goes to slot b + g."""
        return self.blocks + self.groups

    @property
    def counters(self):
        """Arrival counters of the grid-level merge: one per group, then one per slot (for the runs of
        ``FANIN`` blocks that start there)."""
        return self.groups + self.partial_slots

    def share(self, b):
        """Units [lo, hi) of block b: lo = floor(b T / P), as ``split_point`` in bn_common.cuh."""
        return self.units * b // self.blocks, self.units * (b + 1) // self.blocks


def _persistent(units, per_group, block, slots, most=None):
    """A :class:`Launch` of min(slots, units, most) blocks (at least one)."""
    blocks = max(1, min(slots, units, most or units))
    return Launch((blocks, 1, 1), block, units, per_group)


def reduction_launch(lay, vec, slots, blocks=None):
    """Grid of ``bn_forward_stats_*`` and ``bn_backward_reduce_*`` (``vec``: 4 for the _vec4 kernels, else 1).

    ``slots``: resident blocks of the kernel on the whole GPU. Fewer blocks when the tensor is small, so that
    each thread still folds ``MIN_PER_THREAD`` values; ``blocks`` overrides the count (tests use it to force a
    grid-level merge). mc: 2-D blocks from :func:`row_block`, at most ``MC_WIDEST`` vectors wide.
    """
    if lay.kind == "ncs":
        per_group = -(-lay.N * (lay.S // vec) // CHUNK)
        units, block, values = per_group * lay.C, (THREADS, 1, 1), lay.per_channel * lay.C
    else:
        bx, by = row_block(lay.C // vec, vec, MC_WIDEST)
        per_group = lay.N
        units, block = per_group * -(-(lay.C // vec) // bx), (bx, by, 1)
        values = units * bx * vec    # threads x rows, idle lanes of a partial column included
    most = blocks or max(1, values // (THREADS * MIN_PER_THREAD))
    return _persistent(units, per_group, block, blocks or slots, most)


def row_block(width, vec=1, widest=THREADS):
    """(bx, by) with bx * by = THREADS for rows of ``width`` vectors of ``vec`` floats: bx a power of two, at
    most ``widest``, that leaves the fewest lanes idle (ceil(width / bx) * bx - width), ties going to the wider
    block. A warp then reads 32 / bx rows of bx vectors each, so bx is kept to whole 32-byte sectors (bx * vec
    >= 8) unless one column holds the whole row (bx >= width: the warp's rows are then contiguous)."""
    def idle(bx):
        return -(-width // bx) * bx - width

    fits = [2**k for k in range(THREADS.bit_length()) if 2**k <= widest and (2**k * vec >= 8 or 2**k >= width)]
    bx = min(fits, key=lambda bx: (idle(bx), -bx))
    return bx, THREADS // bx


def elementwise_launch(lay, vec, slots):
    """Grid of ``bn_affine_*`` and ``bn_backward_dx_*`` (``vec`` = 1 or 4 floats per thread access).

    ncs: the flat tensor in chunks of ``CHUNK`` vectors, 1-D blocks; mc: rows of columns of ``bx`` vectors,
    2-D blocks (bx, by) from :func:`row_block`. Every slot gets a block unless there are fewer units.
    """
    if lay.kind == "ncs":
        units = -(-lay.N * lay.C * (lay.S // vec) // CHUNK)
        return _persistent(units, units, (THREADS, 1, 1), slots)
    bx, by = row_block(lay.C // vec, vec)
    return _persistent(-(-(lay.C // vec) // bx) * lay.N, lay.N, (bx, by, 1), slots)


class Segment(NamedTuple):
    """Group ``group``'s part of block ``block``'s share: units [lo, hi) counted from the group's first."""

    block: int
    group: int
    lo: int
    hi: int


def segments(launch):
    """Every :class:`Segment` of the split, in slot order (block + group increasing), as ``BlockWork`` in
    bn_common.cuh walks them: a group's segments are consecutive, in block order."""
    out = []
    Q = launch.per_group
    for b in range(launch.blocks):
        k, end = launch.share(b)
        while k < end:
            g = k // Q
            hi = min(end, (g + 1) * Q)
            out.append(Segment(b, g, k - g * Q, hi - g * Q))
            k = hi
    return out
