"""The memory-traffic model of the chapter-5 benchmark, and its results files. NumPy and JSON only.

Batch norm does a handful of flops per value, so on a GPU its time is set by
the bytes it moves. Per float32 value, at best:

* inference reads x and writes y: 8 bytes;
* the training forward reads x for the statistics, then reads it again and
  writes y: 12 bytes (unless a whole channel fits on chip);
* the backward reads dy and x for the two sums, then dy and x again and
  writes dx: 20 bytes.

Dividing by the device's measured copy bandwidth gives the *floor* time of
each pass. It is a floor only if the second read comes from HBM: when the
tensors read twice fit in L2 (``REREAD_BYTES`` per value), it may come from
there, and a row of the results is marked ``l2_resident``. The benchmark's GB/s
column follows the usual convention, 2 * numel * 4 bytes for a forward and
3 * numel * 4 for a backward (each tensor touched once); the effective GB/s
column counts the floor's bytes, re-reads included.

Little's law sets how many bytes each SM must keep in flight to reach a
bandwidth: bandwidth x latency / SMs (:func:`bytes_in_flight_needed`); a
kernel keeps its resident threads times the bytes its compiled hot loop issues
before it uses any (:func:`bytes_in_flight`, from the committed machine-code report).
"""
import json
import math
from pathlib import Path

from . import plan

PASSES = ("forward_inference", "forward_train", "backward")
FLOOR_BYTES = {"forward_inference": 8, "forward_train": 12, "backward": 20}
NOMINAL_BYTES = {"forward_inference": 8, "forward_train": 8, "backward": 12}
REREAD_BYTES = {"forward_inference": 0, "forward_train": 4, "backward": 8}
RESULTS_DIR = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "gpu"


def floor_ms(numel, pass_name, copy_gbps):
    """The time the pass would take moving FLOOR_BYTES per value at the copy bandwidth (GB/s = 1e9 B/s)."""
    return FLOOR_BYTES[pass_name] * numel / (copy_gbps * 1e9) * 1e3


def nominal_gbps(numel, pass_name, ms):
    """GB/s by the convention 2 * numel * 4 (forward) or 3 * numel * 4 (backward)."""
    return NOMINAL_BYTES[pass_name] * numel / (ms * 1e-3) / 1e9


def effective_gbps(numel, pass_name, ms):
    """GB/s counting the FLOOR_BYTES each pass must move, the statistics' re-reads included."""
    return FLOOR_BYTES[pass_name] * numel / (ms * 1e-3) / 1e9


def l2_resident(numel, pass_name, l2_bytes):
    """True when the tensors a pass reads twice fit in L2: the re-read may hit there, and the floor is no floor."""
    return 0 < REREAD_BYTES[pass_name] * numel <= l2_bytes


def bytes_in_flight_needed(gbps, latency_ns, sms):
    """Little's law per SM: the bytes each of ``sms`` SMs must have requested and not yet received to sustain
    ``gbps`` (1e9 B/s) when a load takes ``latency_ns``."""
    return gbps * 1e9 * latency_ns * 1e-9 / sms


def bytes_in_flight(kernel, gpu="H200"):
    """Bytes a full SM of ``kernel`` has in flight at best: resident threads (from the ptxas report) times the
    bytes each issues before it uses one, as the machine code of its hot loop shows (``bytes_before_use`` of
    the committed report, bnref.cuda.sass)."""
    arch, sms = plan.GPUS[gpu]
    per_thread = plan.ptxas_table()[(kernel, arch)]["bytes_before_use"]
    return plan.resident_blocks(kernel, gpu) // sms * plan.THREADS * per_thread


def torch_backend(kernels):
    """What torch ran, from the CUDA kernel names its profiler recorded: "cuDNN", "native" (every kernel in
    at::native), "other", or None (not recorded)."""
    if not kernels:
        return None
    if any("cudnn" in k.lower() for k in kernels):
        return "cuDNN"
    return "native" if all("at::native" in k for k in kernels) else "other"


def load_results(folder=RESULTS_DIR):
    """Every ``<gpu>.json`` written by benchmarks/gpu_batchnorm.py in ``folder``, sorted by file name."""
    folder = Path(folder)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def shape_label(shape, layout="NCHW"):
    return "×".join(str(s) for s in shape) + ("" if layout == "NCHW" else f" {layout}")


def _row_label(row):
    return shape_label(row["shape"], row.get("layout", "NCHW"))   # files before the NHWC rows have no layout


def plot_floors(shapes, ax):
    """Grouped bars: megabytes each pass must move at least, per shape (FLOOR_BYTES per value)."""
    width = 0.8 / len(PASSES)
    for k, pass_name in enumerate(PASSES):
        mb = [FLOOR_BYTES[pass_name] * math.prod(s) / 1e6 for s in shapes]
        ax.bar([i + (k - 1) * width for i in range(len(shapes))], mb, width,
               label=f"{pass_name.replace('_', ' ')}: {FLOOR_BYTES[pass_name]} B/value")
    ax.set_xticks(range(len(shapes)), [shape_label(s) for s in shapes], rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("minimum traffic (MB)")
    ax.legend(fontsize=8)


def plot_results(results, ax):
    """Measured time over the floor per shape (and layout) and pass (1 = at the copy bandwidth), ours and torch
    with cuDNN enabled (which torch uses only for 3-D and larger inputs). Rows whose re-read fits in L2 are
    drawn in grey: their floor is not a floor."""
    markers = {"forward_inference": "o", "forward_train": "s", "backward": "^"}
    for r_i, result in enumerate(results):
        rows = result["rows"]
        labels = list(dict.fromkeys(_row_label(r) for r in rows))
        for pass_name in PASSES:
            sel = [r for r in rows if r["pass"] == pass_name]
            xs = [labels.index(_row_label(r)) + 0.08 * r_i for r in sel]
            colors = ["0.6" if r.get("l2_resident") else f"C{r_i}" for r in sel]
            ax.scatter(xs, [r["ours_over_floor"] for r in sel], marker=markers[pass_name], c=colors,
                       label=f"ours, {pass_name.replace('_', ' ')} ({result['device']})")
            if all(r.get("torch_cudnn_ms") is not None for r in sel) and sel:
                ax.scatter(xs, [r["torch_cudnn_ms"] / r["floor_ms"] for r in sel], marker=markers[pass_name],
                           facecolors="none", edgecolors=colors,
                           label=f"torch, cuDNN enabled, {pass_name.replace('_', ' ')}")
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.15, color="k", lw=1, ls="--")
    ax.set_ylabel("time / floor time")
    ax.legend(fontsize=7, ncol=2)


def results_table(result):
    """A plain-text table of one results file (L2: the re-read fits in L2, so /floor is no bound; "ran": the
    kernels torch ran with cuDNN enabled, which are its native ones below 3-D; "+host": torch over ours on
    max(GPU time, host time) per call, what a caller from Python sees). Files of earlier schemas lack some
    columns ("-")."""
    method = result.get("method", "L2 flushed")
    refs = ", ".join(f"{key[:-5]} {result[key]:.0f}" for key in ("memcpy_gbps", "copy4_gbps", "read_gbps")
                     if key in result)
    head = (f"{result['device']}, {result['date']}: copy {result['copy_gbps']:.0f} GB/s"
            + (f" ({refs})" if refs else "") + f", median of {result['repeats']} runs, {method}\n"
            f"{'shape':>22s} {'pass':>17s} {'ours ms':>9s} {'p10-p90':>13s} {'host us':>7s} {'GB/s':>6s} "
            f"{'eff GB/s':>8s} {'% copy':>6s} {'/floor':>6s} {'L2':>2s} {'torch/ours cuDNN on (ran)':>25s} "
            f"{'+host':>6s} {'off':>6s}")
    lines = [head]
    for r in result["rows"]:
        def fmt(key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"
        spread = f"{fmt('ours_p10_ms', '.3f')}-{fmt('ours_p90_ms', '.3f')}" if "ours_p10_ms" in r else "-"
        lines.append(f"{_row_label(r):>22s} {r['pass']:>17s} {fmt('ours_ms', '9.3f')} {spread:>13s} "
                     f"{fmt('ours_host_us', '7.1f')} {fmt('ours_gbps', '6.0f')} {fmt('ours_eff_gbps', '8.0f')} "
                     f"{fmt('ours_pct_copy', '6.1f')} {fmt('ours_over_floor', '6.2f')} "
                     f"{'L2' if r.get('l2_resident') else '':>2s} {fmt('torch_cudnn_over_ours', '16.2f')} "
                     f"{torch_backend(r.get('torch_cudnn_kernels')) or '':>8s} "
                     f"{fmt('torch_cudnn_user_over_ours', '6.2f')} {fmt('torch_native_over_ours', '6.2f')}")
    return "\n".join(lines)


def kernel_shares_table(result):
    """Our kernels in each row of a results file: launch (grid x block, vector width), the driver's resident
    blocks per SM, registers, and the kernel's share of the pass ("" for files without them)."""
    lines = []
    for r in result["rows"]:
        for k in r.get("ours_kernels", []):
            lines.append(f"{_row_label(r):>22s} {r['pass']:>17s} {k['kernel']:28s} {k['grid'][0]:5d} x "
                         f"{'x'.join(map(str, k['block'][:2])):>6s} vec {k['vec']} {k['blocks_per_sm']:2d}/SM "
                         f"{k['registers']:3d} regs {100 * k['share']:5.1f} %")
    return "\n".join(lines)


# The goals of issue 19, as ratios measured in one run: (pass or "torch", description, value of a row, bound, met).
GOALS = (
    ("forward_train", "time / 12 B floor <= 1.15", lambda r, res: r["ours_over_floor"], lambda v, r: v <= 1.15),
    ("backward", "time / 20 B floor <= 1.15", lambda r, res: r["ours_over_floor"], lambda v, r: v <= 1.15),
    ("forward_inference", "GB/s / best copy >= 0.90", lambda r, res: r["ours_eff_gbps"] / res["copy_gbps"],
     lambda v, r: v >= 0.90),
    ("torch", "torch (cuDNN on) / ours >= 1.0, 1.2 on NCHW with C < 132", lambda r, res: r.get("torch_cudnn_over_ours"),
     lambda v, r: v >= (1.2 if r.get("layout", "NCHW") == "NCHW" and r["shape"][1] < 132 else 1.0)),
)


def goals(result):
    """[(row label, pass, goal, value, met)] of every row of a results file against :data:`GOALS` (rows without
    torch columns skip its goal)."""
    out = []
    for r in result["rows"]:
        for target, text, value, met in GOALS:
            if target in (r["pass"], "torch") and value(r, result) is not None:
                v = value(r, result)
                out.append((_row_label(r), r["pass"], text, v, met(v, r)))
    return out


def goals_table(result):
    """The misses of :func:`goals`, then a count."""
    rows = goals(result)
    lines = [f"{label:>22s} {p:>17s} {text:52s} {v:6.2f}  MISSED" for label, p, text, v, ok in rows if not ok]
    return "\n".join(lines + [f"goals met: {sum(ok for *_, ok in rows)} of {len(rows)}"])
