"""What the compiled chapter-5 kernels do, read off their machine code (SASS) for sm_90 (H100, H200).

A kernel keeps ``plan.LOAD_BYTES`` per thread in flight only if ptxas kept the source's order: all the loads of
a step issued before the first use of one. These tests compile each kernel file with nvcc, disassemble it
(nvdisasm, or cuobjdump -sass) and check that order in every kernel's hot loop, and that the grid-level merge
has a fence on both sides of its ticket; each check is also shown to fail on code that breaks it. Skipped,
with the reason, where nvcc or the disassembler is missing.
"""
import subprocess

import pytest

import bnref
from bnref.cuda import KERNELS, nvcc, plan, sass

needs_tools = pytest.mark.skipif(nvcc.nvcc_path() is None or sass.tool()[0] is None,
                                 reason="nvcc, and nvdisasm or cuobjdump, are needed to read the machine code")
ARCH = "sm_90"
SIMPLE = "bn_channel_moments_ncs"   # the first, simple reduction: one load per step, on purpose

# A hot loop in nvdisasm's form: the first load's result feeds an FADD before the second load is issued.
INTERLEAVED = """
//--------------------- .text.k --------------------------
.text.k:
        /*0000*/                   MOV R2, RZ ;
.L_x_0:
        /*0010*/                   LDG.E.128.CONSTANT R12, desc[UR4][R4.64] ;
        /*0020*/                   FADD R8, R12, R8 ;
        /*0030*/                   LDG.E.128.CONSTANT R16, desc[UR4][R6.64] ;
        /*0040*/                   FADD R8, R16, R8 ;
        /*0050*/                   LDG.E.STRONG.GPU R20, desc[UR4][R2.64] ;
        /*0060*/               @P0 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
"""
# The same loop in cuobjdump's form, both loads issued first.
GROUPED = """
        Function : k
        /*0000*/                   MOV R2, RZ ;                         /* 0x0000000000027202 */
        /*0010*/                   LDG.E.128.CONSTANT R12, desc[UR4][R4.64] ;
        /*0020*/                   LDG.E.128.CONSTANT R16, desc[UR4][R6.64] ;
        /*0030*/                   FADD R8, R12, R8 ;
        /*0040*/                   FADD R8, R16, R8 ;
        /*0050*/               @P0 BRA 0x10 ;
        /*0060*/                   EXIT ;
"""


def test_the_load_order_parser_reads_both_disassemblers():
    (order,) = [sass.load_order("k", ins) for ins in sass.parse(INTERLEAVED).values()]
    assert order == sass.LoadOrder("k", (0x10, 0x60), 2, 32, 1, 16), "the STRONG load of a partial is not streamed"
    (order,) = [sass.load_order("k", ins) for ins in sass.parse(GROUPED).values()]
    assert order == sass.LoadOrder("k", (0x10, 0x50), 2, 32, 2, 32)


def compile_for_arch(tmp_path, file, source=None):
    """Kernel file ``file`` (or ``source`` in its place) compiled for ARCH: (cubin path, ptxas' rows)."""
    cu, cubin = tmp_path / file, tmp_path / f"{file}.cubin"
    cu.write_text(source or bnref.cuda.kernel_source(file))
    proc = subprocess.run([nvcc.nvcc_path(), "-cubin", f"-arch={ARCH}", *bnref.cuda.COMPILE_OPTIONS, "-Xptxas", "-v",
                           str(cu), "-o", str(cubin)], check=True, capture_output=True, text=True)
    return cubin, nvcc.parse_ptxas(proc.stdout + proc.stderr)


def compiled(tmp_path, file, source=None):
    """{kernel: [Instruction]} of kernel file ``file`` (or of ``source`` in its place) compiled for ARCH."""
    return sass.parse(sass.disassemble(compile_for_arch(tmp_path, file, source)[0]))


@needs_tools
@pytest.mark.parametrize("file", sorted(KERNELS))
def test_every_hot_loop_issues_a_whole_step_of_loads_before_it_uses_one(file, tmp_path):
    """Fails when ptxas moved a load of a step after the first use of another (as it did for
    bn_forward_stats_ncs_vec4 at 40 registers, with one division per value: 16 of its 32 bytes). The hot loop
    loads the step and nothing else, and an elementwise kernel's does no special-function work: the fold of a
    channel's (a, b), with inference's square root and division, is out of the loop (it was in the loop, per
    value or float4, when the channel changed at nearly every step, as at 7x7)."""
    for kernel, instructions in compiled(tmp_path, file).items():
        order = sass.load_order(kernel, instructions)
        want = 4 if kernel == SIMPLE else plan.LOAD_BYTES
        assert order.step_bytes == want, f"{kernel}: its hot loop loads {order.step_bytes} B: {order}"
        if "affine" in kernel or "_dx_" in kernel:
            body = [i.opcode for i in instructions if order.loop[0] <= i.address <= order.loop[1]]
            assert not [op for op in body if op.startswith("MUFU")], f"{kernel}: {body}"
        assert order.bytes_before_use >= want, (
            f"{kernel} on {ARCH}: only {order.bytes_before_use} of the step's {order.step_bytes} bytes are issued "
            f"before the first use of one ({order.before_use} of {order.step_loads} loads): {order}")


REDUCTIONS = ["bn_forward.cu", "bn_backward.cu"]
RELEASE = "store_partial(partials, slot * team.lanes + team.lane, v);\n        __threadfence();"
ACQUIRE = "if (is_last) {\n            __threadfence();"


@needs_tools
@pytest.mark.parametrize("file", REDUCTIONS)
@pytest.mark.parametrize("removed", [None, "release", "acquire"])
def test_every_ticket_has_a_fence_on_both_sides(file, removed, tmp_path):
    """A MEMBAR between a block's store of its partial and its ticket (release), and between the ticket and the
    last block's loads of the partials (acquire); the CPU emulator can show a missing release, not a missing
    acquire (tests/test_cuda_emulator.py), so the compiled code is checked for both, and with either fence
    removed from the source the check fails."""
    source = bnref.cuda.kernel_source(file)
    if removed:
        old = RELEASE if removed == "release" else ACQUIRE
        assert source.count(old) == 1
        source = source.replace(old, old.replace("__threadfence();", ""))
    for kernel, instructions in compiled(tmp_path, file, source).items():
        tickets = sass.fences(instructions)
        if "reduce_ncs" in kernel or "reduce_mc" in kernel or "stats" in kernel:
            assert len(tickets) >= 2, f"{kernel}: a run's ticket and a group's ticket"
        for t in tickets:
            assert (t.release, t.acquire) == (removed != "release", removed != "acquire"), f"{kernel}: {t}"


@needs_tools
def test_eight_blocks_per_sm_would_cost_most_kernels_their_bytes_in_flight(tmp_path):
    """The page's reason for 5 or 6 resident blocks, not 8: compiled for 8 (32 registers a thread), most kernels
    spill or use a load before the rest of their step is issued."""
    short = set()
    for file in KERNELS:
        source = bnref.cuda.kernel_source(file).replace("#define BN_BLOCKS_PER_SM 6", "#define BN_BLOCKS_PER_SM 8")
        source = source.replace("#define BN_BLOCKS_PER_SM_WIDE 5", "#define BN_BLOCKS_PER_SM_WIDE 8")
        cubin, rows = compile_for_arch(tmp_path, file, source)
        orders = sass.report(cubin)
        for r in rows:
            assert r.registers <= 32, r
            if r.kernel != SIMPLE and (r.spill_stores or orders[r.kernel].bytes_before_use < plan.LOAD_BYTES):
                short.add(r.kernel)
    kernels = {k for names in KERNELS.values() for k in names} - {SIMPLE}
    assert len(short) > len(kernels) / 2, sorted(short)
