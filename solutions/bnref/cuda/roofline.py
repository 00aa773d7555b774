"""The memory-traffic model of the chapter-5 benchmark, and its results files. NumPy and JSON only.

Batch norm does a handful of flops per value, so on a GPU its time is set by
the bytes it moves. Per float32 value, at best:

* inference reads x and writes y: 8 bytes;
* the training forward reads x for the statistics, then reads it again and
  writes y: 12 bytes (unless a whole channel fits on chip);
* the backward reads dy and x for the two sums, then dy and x again and
  writes dx: 20 bytes.

Dividing by the device's measured copy bandwidth gives the *floor* time of
each pass. The benchmark's GB/s column follows the usual convention instead,
2 * numel * 4 bytes for a forward and 3 * numel * 4 for a backward (each
tensor touched once).
"""
import json
import math
from pathlib import Path

PASSES = ("forward_inference", "forward_train", "backward")
FLOOR_BYTES = {"forward_inference": 8, "forward_train": 12, "backward": 20}
NOMINAL_BYTES = {"forward_inference": 8, "forward_train": 8, "backward": 12}
RESULTS_DIR = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "gpu"


def floor_ms(numel, pass_name, copy_gbps):
    """The time the pass would take moving FLOOR_BYTES per value at the copy bandwidth (GB/s = 1e9 B/s)."""
    return FLOOR_BYTES[pass_name] * numel / (copy_gbps * 1e9) * 1e3


def nominal_gbps(numel, pass_name, ms):
    """GB/s by the convention 2 * numel * 4 (forward) or 3 * numel * 4 (backward)."""
    return NOMINAL_BYTES[pass_name] * numel / (ms * 1e-3) / 1e9


def load_results(folder=RESULTS_DIR):
    """Every ``<gpu>.json`` written by benchmarks/gpu_batchnorm.py in ``folder``, sorted by file name."""
    folder = Path(folder)
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []


def shape_label(shape):
    return "×".join(str(s) for s in shape)


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
    """Measured time over the floor per shape and pass (1 = at the copy bandwidth), ours and torch with cuDNN."""
    markers = {"forward_inference": "o", "forward_train": "s", "backward": "^"}
    for r_i, result in enumerate(results):
        rows = result["rows"]
        shapes = list(dict.fromkeys(tuple(r["shape"]) for r in rows))
        for pass_name in PASSES:
            sel = [r for r in rows if r["pass"] == pass_name]
            xs = [shapes.index(tuple(r["shape"])) + 0.08 * r_i for r in sel]
            ax.plot(xs, [r["ours_over_floor"] for r in sel], markers[pass_name], color=f"C{r_i}",
                    label=f"ours, {pass_name.replace('_', ' ')} ({result['device']})")
            if all(r.get("torch_cudnn_ms") is not None for r in sel) and sel:
                ax.plot(xs, [r["torch_cudnn_ms"] / r["floor_ms"] for r in sel], markers[pass_name],
                        mfc="none", color=f"C{r_i}", label=f"torch + cuDNN, {pass_name.replace('_', ' ')}")
        ax.set_xticks(range(len(shapes)), [shape_label(s) for s in shapes], rotation=20, ha="right")
    ax.axhline(1.0, color="k", lw=1)
    ax.axhline(1.15, color="k", lw=1, ls="--")
    ax.set_ylabel("time / floor time")
    ax.legend(fontsize=7, ncol=2)


def results_table(result):
    """A plain-text table of one results file."""
    head = (f"{result['device']}, {result['date']}: measured copy {result['copy_gbps']:.0f} GB/s, "
            f"median of {result['repeats']} runs, L2 flushed\n"
            f"{'shape':>18s} {'pass':>17s} {'ours ms':>9s} {'GB/s':>6s} {'% copy':>6s} {'/floor':>6s} "
            f"{'torch/ours cuDNN':>16s} {'native':>6s}")
    lines = [head]
    for r in result["rows"]:
        def fmt(key, spec):
            return format(r[key], spec) if r.get(key) is not None else "-"
        lines.append(f"{shape_label(r['shape']):>18s} {r['pass']:>17s} {fmt('ours_ms', '9.3f')} "
                     f"{fmt('ours_gbps', '6.0f')} {fmt('ours_pct_copy', '6.1f')} {fmt('ours_over_floor', '6.2f')} "
                     f"{fmt('torch_cudnn_over_ours', '16.2f')} {fmt('torch_native_over_ours', '6.2f')}")
    return "\n".join(lines)

