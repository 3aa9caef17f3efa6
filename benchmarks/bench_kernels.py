"""Ternary CPU kernels vs the CPU baselines, measured in one run (issue 3).

    python benchmarks/bench_kernels.py [--shapes 4096x4096,4096x11008,11008x4096]
        [--m 1,8,128,2048] [--threads 1,2] [--no-ort] [--out benchmarks/results/kernels.json]

Per layer shape K x N (in x out), token count M and thread count T, the median time of:
fp32 ``F.linear``, bf16 ``F.linear``, ``torch._int_mm`` on int8 weights (``W_i8[N,K].t()``),
onnxruntime ``com.microsoft::MatMulNBits`` bits=2 block_size=128 accuracy_level=4 (weights
packed by our own packer, code = q + 2, as docs/../reference/onnx_export.md says), and
bitcpm's ``kernels.cpu.packed_linear`` (float x in, per-token int8 quantization fused, 2-bit
weights). Every format's weights are rotated over >= 136 MiB of copies so none of them sits
in the 32 MiB L3. Also measured in the same run: the read bandwidth of a plain > 1 GiB read
(1 and 2 threads), and the packed kernel's achieved bandwidth on its weight bytes.

Prints a table of ratios (baseline time / bitcpm time: > 1 means bitcpm is faster) and
writes JSON with the raw medians, CPU model and flags, thread counts and versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bitcompile.kernels import cpu, packing

ROTATE_BYTES = 136 << 20


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        text = Path("/proc/cpuinfo").read_text()
        first = text.split("\n\n")[0]
        fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(model=fields.get("model name"), family=fields.get("cpu family"), model_id=fields.get("model"))
        info["flags"] = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "fma", "gfni", "amx")))
    except OSError:
        pass
    return info


def median_ms(fn, n_items: int, budget_s: float = 0.4, min_reps: int = 5, max_reps: int = 300) -> float:
    """Median of repeated calls ``fn(i)``, i rotating over the weight copies; warm-up first."""
    for i in range(2):
        fn(i % n_items)
    t0 = time.perf_counter()
    fn(0)
    one = time.perf_counter() - t0
    reps = int(min(max_reps, max(min_reps, budget_s / max(one, 1e-6))))
    times = []
    for r in range(reps):
        t = time.perf_counter()
        fn(r % n_items)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def copies(nbytes: int) -> int:
    return max(2, math.ceil(ROTATE_BYTES / nbytes))


def read_bandwidth(threads: int, nbytes: int = 1 << 30) -> float:
    """GB/s of a plain read of ``nbytes`` (best of 5; one pass is > 1 GiB)."""
    if not cpu.available():
        return float("nan")
    buf = torch.ones(nbytes, dtype=torch.uint8)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        cpu.library.LIB.bc_read_bytes(buf.data_ptr(), nbytes, threads)
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


def ort_sessions(q: torch.Tensor, s: torch.Tensor, n_copies: int, threads: int):
    """MatMulNBits bits=2 block 128 acc 4 sessions (one per weight copy), packed as onnx_export.md says."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n, k = q.shape
    bs = 128
    kb = -(-k // bs)
    c = torch.full((n, kb * bs), 2, dtype=torch.uint8)  # pad with code 2 = weight 0
    c[:, :k] = (q.to(torch.int16) + 2).to(torch.uint8)
    c = c.reshape(n, kb, bs // 4, 4)
    blob = (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).numpy()
    scales = s.expand(n, kb).contiguous().numpy().astype(np.float32)
    node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=2, block_size=bs, accuracy_level=4)  # fmt: skip
    graph = helper.make_graph(
        [node], "mnb", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])],
        initializer=[onnx.numpy_helper.from_array(blob, "B"), onnx.numpy_helper.from_array(scales, "scales")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    data = model.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return [ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"]) for _ in range(n_copies)]


def bench_shape(k: int, n: int, ms: list[int], threads: int, use_ort: bool, log) -> list[dict]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(k * 7 + n)
    w = torch.randn(n, k, generator=g) * 0.02
    q, s = cpu.quantize_weight(w, -1)
    packed = cpu.pack_codes(q)
    w_f32 = [w.clone() for _ in range(copies(w.numel() * 4))]
    w_bf16 = [w.bfloat16() for _ in range(copies(w.numel() * 2))]
    w_i8 = [q.clone() for _ in range(copies(q.numel()))]
    w_pk = [packed.clone() for _ in range(copies(packed.numel()))]
    sessions = []
    if use_ort:
        try:
            sessions = ort_sessions(q, s, copies(packed.numel() + s.numel() * 4 * k // 128), threads)
        except Exception as e:  # onnxruntime missing or refusing the model: say so, keep going
            log(f"  onnxruntime MatMulNBits skipped: {type(e).__name__}: {e}")
    rows = []
    for m in ms:
        x = torch.randn(m, k, generator=g)
        xb = x.bfloat16()
        xq, _ = cpu.quantize_activations(x)
        r = {"K": k, "N": n, "M": m, "threads": threads}
        r["fp32_ms"] = median_ms(lambda i: F.linear(x, w_f32[i]), len(w_f32))
        r["bf16_ms"] = median_ms(lambda i: F.linear(xb, w_bf16[i]), len(w_bf16))
        r["int_mm_ms"] = median_ms(lambda i: torch._int_mm(xq, w_i8[i].t()), len(w_i8))
        r["bitcpm_ms"] = median_ms(lambda i: cpu.packed_linear(x, w_pk[i], s, k, -1, None, True, torch.float32), len(w_pk))
        if sessions:
            xn = x.numpy()
            bindings = []
            for sess in sessions:
                b = sess.io_binding()
                b.bind_cpu_input("A", xn)
                b.bind_output("Y")
                bindings.append((sess, b))
            r["ort_mnb2_ms"] = median_ms(lambda i: bindings[i][0].run_with_iobinding(bindings[i][1]), len(bindings))
        t = r["bitcpm_ms"] / 1e3
        r["bitcpm_gops"] = 2 * m * n * k / t / 1e9
        r["bitcpm_weight_GBps"] = packed.numel() / t / 1e9
        for base in ("fp32", "bf16", "int_mm", "ort_mnb2"):
            if f"{base}_ms" in r:
                r[f"vs_{base}"] = r[f"{base}_ms"] / r["bitcpm_ms"]
        rows.append(r)
        log(
            f"  K={k} N={n} M={m} T={threads}: bitcpm {r['bitcpm_ms']:.3f} ms, fp32 {r['fp32_ms']:.3f}, "
            f"bf16 {r['bf16_ms']:.3f}, _int_mm {r['int_mm_ms']:.3f}"
            + (f", ORT {r['ort_mnb2_ms']:.3f}" if "ort_mnb2_ms" in r else "")
        )
    return rows


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="KxN list (in x out)")
    ap.add_argument("--m", default="1,8,128,2048", help="token counts")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--no-ort", action="store_true", help="skip the onnxruntime MatMulNBits baseline")
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    args = ap.parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if not cpu.available():
        log(f"bitcompile C kernels unavailable: {cpu.unavailable_reason()}")
        return 1
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.m.split(",")]
    threads = [int(v) for v in args.threads.split(",")]
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = None
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "cpu": cpu_info(),
        "torch": torch.__version__,
        "onnxruntime": ort_version,
        "isa": cpu.isa(),
        "layout": f"{packing.LAYOUT_NAME} v{packing.LAYOUT_VERSION}",
        "load_average_start": load_average(),
        "read_GBps": {},
        "rows": [],
    }
    for t in threads:
        result["read_GBps"][t] = read_bandwidth(t)
        log(f"plain read of 1 GiB, {t} thread(s): {result['read_GBps'][t]:.1f} GB/s")
    for k, n in shapes:
        for t in threads:
            result["rows"].extend(bench_shape(k, n, ms, t, not args.no_ort and ort_version is not None, log))
    for r in result["rows"]:
        r["bitcpm_read_fraction"] = r["bitcpm_weight_GBps"] / result["read_GBps"][r["threads"]]
    result["load_average_end"] = load_average()

    hdr = ("K", "N", "M", "T", "bitcpm ms", "GOPS", "wGB/s", "%read", "x fp32", "x bf16", "x _int_mm", "x ORT-2bit")
    print("| " + " | ".join(hdr) + " |")
    print("|" + "---|" * len(hdr))
    for r in result["rows"]:
        cells = [r["K"], r["N"], r["M"], r["threads"], f"{r['bitcpm_ms']:.3f}", f"{r['bitcpm_gops']:.0f}",
                 f"{r['bitcpm_weight_GBps']:.1f}", f"{100 * r['bitcpm_read_fraction']:.0f}%",
                 f"{r['vs_fp32']:.2f}", f"{r['vs_bf16']:.2f}", f"{r['vs_int_mm']:.2f}",
                 f"{r['vs_ort_mnb2']:.2f}" if "vs_ort_mnb2" in r else "n/a"]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print(f"read bandwidth GB/s: {result['read_GBps']}; load average start/end: "
          f"{result['load_average_start']} / {result['load_average_end']}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
