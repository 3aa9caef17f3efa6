"""GEMV from DRAM: the 1.6-bit layout (5 weights per byte) vs the canonical 2-bit layout (issue 14).

    nice -n 10 python benchmarks/bench_layouts.py [--shapes 4096x4096,11008x4096] [--threads 1,2]
        [--reps 7] [--ring-mib 0] [--out benchmarks/results/layouts.json]

Shapes are ``N x K`` (out x in). Each layout's packed weights are copied into a ring of
distinct buffers larger than the last-level cache (``--ring-mib``; 0 = 1.5 x the L3 size
sysfs reports, at least 256 MiB), and every call reads the next copy, so each GEMV streams its
weights from DRAM. A call is the serving path of one packed layer at M = 1:
``kernels.cpu.PreparedPackedLinear`` (per-token int8 quantization + the packed kernel, one C
call), per-row scales. One repetition times one pass over the ring for each layout, the
layouts alternating, so both see the same load; the report gives min and median over the
repetitions, the ratio 2-bit time / 1.6-bit time (> 1: the 1.6-bit layout is faster), the
bytes read per call and the achieved bandwidth, and a plain-read bandwidth of the ring
(``bc_read_bytes``) measured in the same run. The machine is shared: the load average at
start and end is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bitcompile.kernels import cpu, packing, packing_base3, reference
from bitcompile.kernels.cpu import library


def l3_bytes() -> int:
    """The largest cache size sysfs reports for cpu0 (0 when unknown)."""
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best


def plain_read_gbps(ring: list[torch.Tensor], threads: int) -> float:
    """GB/s of a plain read over the ring's buffers (best of 3 passes)."""
    best = 0.0
    total = sum(t.numel() // 64 * 64 for t in ring)
    for _ in range(3):
        t0 = time.perf_counter()
        for t in ring:
            library.LIB.bc_read_bytes(t.data_ptr(), t.numel() // 64 * 64, threads)
        best = max(best, total / (time.perf_counter() - t0) / 1e9)
    return best


def build_ring(packed: torch.Tensor, scales: torch.Tensor, k: int, layout: str, ring_bytes: int):
    """Distinct copies of one packed weight (together >= ring_bytes), each with its prepared call."""
    count = max(2, -(-ring_bytes // packed.numel()))
    copies = [packed.clone() for _ in range(count)]
    calls = [cpu.PreparedPackedLinear(c, scales, k, -1, None, layout=layout) for c in copies]
    return copies, calls


def time_pass(calls, x: torch.Tensor) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per call over one pass of the ring.

    NOTE: on the shared machine the wall time includes the time the kernel's threads were
    descheduled; the CPU time does not (but counts the pool's spin-waits at 2 threads)."""
    t0, c0 = time.perf_counter(), time.process_time()
    for call in calls:
        call(x)
    return (time.perf_counter() - t0) / len(calls), (time.process_time() - c0) / len(calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="N x K (out x in) list")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--ring-mib", type=int, default=0, help="bytes of weight copies per layout; 0 = 1.5 x L3")
    parser.add_argument("--out", default="benchmarks/results/layouts.json")
    args = parser.parse_args(argv)
    if not cpu.available():
        print(f"bench_layouts: the C kernels are not available ({cpu.unavailable_reason()}); nothing to measure")
        return 1
    l3 = l3_bytes()
    ring_bytes = (args.ring_mib << 20) if args.ring_mib else max(256 << 20, int(1.5 * l3))
    threads = [int(t) for t in args.threads.split(",")]
    load_start = os.getloadavg()
    torch.manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        q, s = reference.quantize_weight(torch.randn(n, k), -1)
        s = s.float().contiguous()
        x = torch.randn(1, k)
        layouts = {"2bit": packing.pack_codes(q), "1.6bit": packing_base3.pack_codes(q)}
        rings = {name: build_ring(p, s, k, name, ring_bytes) for name, p in layouts.items()}
        y2, y16 = rings["2bit"][1][0](x), rings["1.6bit"][1][0](x)
        if not torch.equal(y2, y16):
            raise SystemExit(f"bench_layouts: {shape}: the two layouts disagree (max diff {(y2 - y16).abs().max()})")
        for t in threads:
            torch.set_num_threads(t)
            times: dict[str, list[float]] = {name: [] for name in rings}
            cpu_times: dict[str, list[float]] = {name: [] for name in rings}
            for name, (_, calls) in rings.items():  # warm-up pass (first-touch, thread start)
                time_pass(calls, x)
            for _ in range(args.reps):
                for name, (_, calls) in rings.items():
                    wall, cpu_s = time_pass(calls, x)
                    times[name].append(wall)
                    cpu_times[name].append(cpu_s)
            read = plain_read_gbps(rings["2bit"][0], t)
            row = {"N": n, "K": k, "threads": t, "plain_read_GBps": read}
            for name, ts in times.items():
                nbytes = layouts[name].numel()
                row[name] = {
                    "bytes": nbytes, "bytes_per_weight": nbytes / (n * k), "copies": len(rings[name][0]),
                    "min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3,
                    "GBps_at_min": nbytes / min(ts) / 1e9, "all_ms": [v * 1e3 for v in ts],
                    "cpu_min_ms": min(cpu_times[name]) * 1e3, "cpu_median_ms": statistics.median(cpu_times[name]) * 1e3,
                }  # fmt: skip
            row["speedup_min"] = row["2bit"]["min_ms"] / row["1.6bit"]["min_ms"]
            row["speedup_median"] = row["2bit"]["median_ms"] / row["1.6bit"]["median_ms"]
            row["speedup_cpu_min"] = row["2bit"]["cpu_min_ms"] / row["1.6bit"]["cpu_min_ms"]
            row["speedup_cpu_median"] = row["2bit"]["cpu_median_ms"] / row["1.6bit"]["cpu_median_ms"]
            row["speedup_per_rep"] = [a / b for a, b in zip(times["2bit"], times["1.6bit"])]
            rows.append(row)
            print(
                f"{n}x{k} T={t}: 2-bit min {row['2bit']['min_ms']:.3f} / med {row['2bit']['median_ms']:.3f} ms "
                f"({row['2bit']['GBps_at_min']:.1f} GB/s), 1.6-bit min {row['1.6bit']['min_ms']:.3f} / med "
                f"{row['1.6bit']['median_ms']:.3f} ms ({row['1.6bit']['GBps_at_min']:.1f} GB/s); speedup min "
                f"{row['speedup_min']:.3f}x, median {row['speedup_median']:.3f}x; CPU-time speedup min "
                f"{row['speedup_cpu_min']:.3f}x, median {row['speedup_cpu_median']:.3f}x; plain read {read:.1f} GB/s",
                flush=True,
            )
        del rings
    record = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "cpu": platform.processor() or platform.machine(),
        "isa": cpu.isa(),
        "kernel_isa_1.6bit": library.ISA_BY_ID[cpu.PreparedPackedLinear(layouts["1.6bit"], s, k, -1, None, layout="1.6bit").run_isa],
        "l3_bytes": l3,
        "ring_bytes_per_layout": ring_bytes,
        "torch": torch.__version__,
        "layouts": {"2bit": f"{packing.LAYOUT_NAME} v{packing.LAYOUT_VERSION}",
                    "1.6bit": f"{packing_base3.LAYOUT_NAME} v{packing_base3.LAYOUT_VERSION}"},  # fmt: skip
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
