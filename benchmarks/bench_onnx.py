"""onnxruntime latency of the ternary ONNX export vs the fp32 ONNX export of the same model.

    python benchmarks/bench_onnx.py                    # Llama-shaped, hidden 1024, 4 layers (~2 min)
    python benchmarks/bench_onnx.py --quick            # tiny shapes, a smoke run (timings meaningless)
    python benchmarks/bench_onnx.py --json out.json

One model (TinyLlama shape: RMSNorm, q/k/v/o, SwiGLU; tied lm_head stays float), three
ways, all measured in this run on this machine:

* ``fp32 onnx``      - ``torch.onnx.export`` of the float model, onnxruntime CPU;
* ``ternary onnx``   - ``bitcompile.export_onnx`` (MatMulNBits, 2-bit, accuracy_level=4), and
  the standard-ONNX ``qdq`` export (INT2 DequantizeLinear, fused by onnxruntime at load);
* ``bitcpm packed``  - the packed PyTorch model (``bitcompile.pack``, C kernels), eager.

Shapes: decode = one token (M=1; the export has no KV cache, so this is one token's
forward with no attention context: the weight-bound part of decoding); prefill = 128
tokens (M=128). Threads: 1 and 2 (onnxruntime ``intra_op_num_threads``,
``torch.set_num_threads``). Median of repeated runs after warm-up. The machine may be
shared: the load average before and after is printed and written to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import bitcompile
from bitcompile.export.onnx import _DROPPED_NODE_METADATA, _quiet_exporter
from bitcompile.models import TinyLlama, TinyLlamaConfig


def _median_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few repeats (a smoke run)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--json", default="bench_onnx.json", help="where to write the results")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.prefill = 128, 256, 2, 16

    torch.manual_seed(0)
    config = TinyLlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
        num_heads=max(1, args.hidden // 64), max_seq_len=max(256, args.prefill),
    )  # fmt: skip
    model = TinyLlama(config).eval()
    load_before = os.getloadavg()
    results: dict = {
        "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_layers", "vocab_size")},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "versions": {},
        "rows": [],
    }
    import onnx
    import onnxruntime

    results["versions"] = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        example = (torch.randint(0, config.vocab_size, (1, 8)),)
        dims = {"tokens": {1: torch.export.Dim.DYNAMIC}}
        with _quiet_exporter():
            fp32 = torch.onnx.export(model, example, dynamo=True, dynamic_shapes=dims, verbose=False)
        for node in fp32.model.graph:  # same node metadata as export_onnx writes, for a fair file size
            for key in _DROPPED_NODE_METADATA:
                node.metadata_props.pop(key, None)
        fp32.save(str(tmp / "fp32.onnx"))
        packed = bitcompile.pack(model)  # in place: the float weights are gone after this line
        ternary = bitcompile.export_onnx(packed, example, tmp / "ternary.onnx", dynamic_shapes=({1: torch.export.Dim.DYNAMIC},))
        qdq = bitcompile.export_onnx(
            packed, example, tmp / "qdq.onnx", format="qdq", dynamic_shapes=({1: torch.export.Dim.DYNAMIC},)
        )  # fmt: skip
        files = {"fp32 onnx": tmp / "fp32.onnx", "ternary onnx (MatMulNBits)": ternary.path, "ternary onnx (qdq, fused)": qdq.path}
        results["file_bytes"] = {name: path.stat().st_size for name, path in files.items()}
        kernel = {m.kernel for m in packed.modules() if isinstance(m, bitcompile.PackedTernaryLinear)}
        results["bitcpm_kernel"] = sorted(kernel)

        for threads in (1, 2):
            sessions = {name: _ort_session(path, threads) for name, path in files.items()}
            for shape_name, m in (("decode M=1", 1), (f"prefill M={args.prefill}", args.prefill)):
                tokens = torch.randint(0, config.vocab_size, (1, m))
                repeats = 5 if args.quick else (40 if m == 1 else 8)
                row = {"shape": shape_name, "threads": threads}
                for name, sess in sessions.items():
                    feed = {sess.get_inputs()[0].name: tokens.numpy()}
                    row[name] = _median_ms(lambda: sess.run(None, feed), 3, repeats)
                torch.set_num_threads(threads)
                with torch.no_grad():
                    row["bitcpm packed (PyTorch)"] = _median_ms(lambda: packed(tokens), 3, repeats)
                results["rows"].append(row)
    results["load_average"] = {"before": load_before, "after": os.getloadavg()}

    columns = ["fp32 onnx", "ternary onnx (MatMulNBits)", "ternary onnx (qdq, fused)", "bitcpm packed (PyTorch)"]
    print(f"Llama-shaped model: hidden {config.hidden_size}, intermediate {config.intermediate_size}, "
          f"{config.num_layers} layers; ms per forward (median)")  # fmt: skip
    header = f"| {'shape':<14} | thr | " + " | ".join(f"{c:>26}" for c in columns) + " | MatMulNBits vs fp32 |"
    print(header)
    print("|" + "---|" * (len(columns) + 3))
    for row in results["rows"]:
        cells = " | ".join(f"{row[c]:>26.3f}" for c in columns)
        speedup = row["fp32 onnx"] / row["ternary onnx (MatMulNBits)"]
        print(f"| {row['shape']:<14} | {row['threads']:>3} | {cells} | {speedup:>18.2f}x |")
    sizes = results["file_bytes"]
    print("file bytes: " + ", ".join(f"{k} {v:,}" for k, v in sizes.items()))
    print(f"bitcpm kernel: {', '.join(results['bitcpm_kernel'])}; load average before {load_before}, after {results['load_average']['after']}")
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.json}")
    decode_1t = next(r for r in results["rows"] if r["shape"] == "decode M=1" and r["threads"] == 1)
    if not args.quick and decode_1t["ternary onnx (MatMulNBits)"] >= decode_1t["fp32 onnx"]:
        print("WARNING: the ternary ONNX model is not faster than fp32 at decode")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
