"""Launch shapes of the chapter-5 kernels: pure Python, shared by the CuPy wrappers and the NumPy mirror.

Everything that decides *which thread handles which element, and in which
order the partial results merge* lives here, so that ``bnref.cuda.mirror``
replays exactly the tree the GPU runs. The constants are reasonable defaults
for recent NVIDIA GPUs; they have not been tuned on hardware yet.
"""
import math
from typing import NamedTuple

THREADS = 256           # threads per block, every kernel (each is __launch_bounds__(256))
MC_BLOCK = (32, 8)      # channels-last reductions: 32 channels x 8 rows of threads
BLOCKS_PER_SM = 8       # 2048 resident threads per SM / 256
MIN_PER_THREAD = 16     # a reduction block is split no further than 16 values per thread
WAVES = 2               # elementwise grids: about this many full waves of resident blocks
MAX_GRID_Y = 65535
MAX_GRID_X = 2**31 - 1


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


def blocks_per_channel(per_channel, groups, rows_per_block, sm_count):
    """G, the number of blocks that share one channel (ncs) or one column of 32 channels (mc).

    Enough blocks for about one full wave of the GPU (``BLOCKS_PER_SM * sm_count``
    in all, over ``groups`` channels or channel columns), but no fewer than
    ``MIN_PER_THREAD`` values per thread row.
    """
    target = -(-BLOCKS_PER_SM * sm_count // groups)
    enough_work = -(-per_channel // (rows_per_block * MIN_PER_THREAD))
    return max(1, min(target, enough_work, MAX_GRID_Y))


class ReductionLaunch(NamedTuple):
    grid: tuple
    block: tuple
    G: int          # blocks per channel (ncs) or per column of channels (mc)
    counters: int   # arrival counters needed by the grid-level merge


def reduction_launch(lay, sm_count, G=None):
    """Grid and block of ``bn_forward_stats_*`` and ``bn_backward_reduce_*`` for a :class:`Layout`."""
    if lay.kind == "ncs":
        G = G or blocks_per_channel(lay.per_channel, lay.C, THREADS, sm_count)
        return ReductionLaunch((G, lay.C, 1), (THREADS, 1, 1), G, lay.C)
    bx, by = MC_BLOCK
    columns = -(-lay.C // bx)
    G = G or blocks_per_channel(lay.N, columns, by, sm_count)
    return ReductionLaunch((columns, G, 1), (bx, by, 1), G, columns)


def row_block(width):
    """(bx, by) for rows of ``width`` vectors: bx a multiple of 32 that leaves the fewest lanes idle
    (ceil(width / bx) * bx - width); ties go to more threads per block, then to wider rows."""
    def cost(bx):
        return (-(-width // bx) * bx - width, -(bx * (THREADS // bx)), -bx)

    bx = min(range(32, THREADS + 1, 32), key=cost)
    return bx, THREADS // bx


def elementwise_launch(lay, vec, sm_count):
    """Grid and block of ``bn_affine_*`` and ``bn_backward_dx_*`` (``vec`` = 1 or 4 floats per thread access).

    ncs: rows are the N*C (sample, channel) pairs, S/vec vectors long; mc: rows
    are the M samples, C/vec vectors wide. Threads along x cover a row, and the
    grid strides over rows to stay near ``WAVES`` full waves of blocks.
    """
    target = WAVES * BLOCKS_PER_SM * sm_count
    if lay.kind == "ncs":
        rows, width = lay.N * lay.C, lay.S // vec
        bx, by = row_block(width)
        grid_y = min(-(-width // bx), MAX_GRID_Y)
        grid_x = max(1, min(-(-rows // by), -(-target // grid_y), MAX_GRID_X))
        return (grid_x, grid_y, 1), (bx, by, 1)
    rows, width = lay.N, lay.C // vec
    bx, by = row_block(width)
    grid_x = -(-width // bx)
    grid_y = max(1, min(-(-rows // by), -(-target // grid_x), MAX_GRID_Y))
    return (grid_x, grid_y, 1), (bx, by, 1)


def vector_width(lay, aligned):
    """4 when every row is a whole number of float4s and the arrays are 16-byte aligned, else 1."""
    row = lay.S if lay.kind == "ncs" else lay.C
    return 4 if aligned and row % 4 == 0 else 1
