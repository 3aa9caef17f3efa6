"""Throughput of a Llama-shaped model with ``target="cann"`` vs plain bf16, on an Ascend NPU.

    python benchmarks/bench_cann.py                 # on a machine with CANN + torch_npu: real numbers
    python benchmarks/bench_cann.py --smoke         # CPU CI: a correctness smoke test

On an NPU both models run on ``npu:0`` with torch_npu's kernels (``npu_dynamic_quant`` +
``npu_quant_matmul`` for W1.58A8, ``npu_weight_quant_batchmatmul`` for groups / weight-only)
and the rest of the graph goes to torchair.

Without an NPU the script runs the same compiled model on CPU through bitcompile's emulator
of the torch_npu operators. THE TIMINGS IT PRINTS THERE MEAN NOTHING: the emulator is a
readable reference implementation, not a fast kernel, and says nothing about Ascend speed.
It only checks that the cann path compiles, runs, and agrees with the reference target
within the target's tolerance, ``1e-2 * (max|y_ref| + |y_ref|)`` (docs/cann.md "Numerics": the
NPU quantizes activations as ``x * (127/max)``, so outputs are close, not bit-identical).
``--chip`` plans for another Ascend chip (A2, A3, 310P; default: detected, A2 on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch

from bitcompile.models import TinyLlama, TinyLlamaConfig


def _device() -> str:
    try:
        import torch_npu  # noqa: F401  (only on machines with CANN; never at bitcompile import)

        return "npu:0" if torch.npu.is_available() else "cpu"
    except Exception:  # noqa: BLE001  (absent, or installed without CANN)
        return "cpu"


def _emulated_chip(device: str, chip: str) -> contextlib.AbstractContextManager:
    """On CPU, make the emulator refuse what the chosen chip lacks (a real NPU checks for itself)."""
    if device != "cpu" or chip == "auto":
        return contextlib.nullcontext()
    from bitcompile.kernels.npu_emulator import emulate

    return emulate(chip=chip)


def _sync(device: str) -> None:
    if device.startswith("npu"):
        torch.npu.synchronize()


def _tokens_per_s(fn, tokens: torch.Tensor, device: str, iters: int) -> float:
    torch._dynamo.reset()  # one backend's cache at a time: no recompiles inside the timed loop
    with torch.no_grad():
        fn(tokens)  # compile
        fn(tokens)  # warm up
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            fn(tokens)
        _sync(device)
    return iters * tokens.numel() / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, few iterations (CPU CI)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--chip", default="auto", choices=("auto", "A2", "A3", "310P"))
    args = parser.parse_args(argv)

    device = _device()
    if args.smoke:
        config, batch, seq, iters = TinyLlamaConfig(), 2, 16, 5
    else:  # SmolLM-135M-like widths, fewer layers
        config = TinyLlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=8, num_heads=9, max_seq_len=512
        )
        batch, seq, iters = args.batch, args.seq, args.iters
    torch.manual_seed(0)
    model = TinyLlama(config).to(device=device, dtype=torch.bfloat16).eval()
    tokens = torch.randint(0, config.vocab_size, (batch, seq), device=device)
    inner = "aot_eager" if device == "cpu" else "inductor"  # inductor is replaced by torchair on an NPU

    torch._dynamo.reset()
    bf16 = torch.compile(model, backend="aot_eager" if device == "cpu" else "npu")
    options = {"target": "cann", "inner": inner, "exclude": ["lm_head"], "chip": args.chip}
    cann = torch.compile(model, backend="bitcpm", options=options)
    reference = torch.compile(model, backend="bitcpm", options={"target": "reference", "inner": "aot_eager"})

    with torch.no_grad(), _emulated_chip(device, args.chip):
        got, want = cann(tokens), reference(tokens) if device == "cpu" else None
    if want is not None:
        # npu_dynamic_quant multiplies by 127/max where the reference divides by max/127: a code
        # flips by one now and then, so the target's tolerance is 1e-2 * (max|ref| + |ref|) (docs/cann.md)
        delta = (got.float() - want.float()).abs()
        bound = 1e-2 * (want.float().abs().max() + want.float().abs())
        if not torch.all(delta <= bound):
            print(f"FAIL: cann output differs from reference by {delta.max().item():.3g} (over the tolerance)")
            return 1
        rel = delta.max().item() / want.float().abs().max().item()
        print(f"cann output within tolerance of the reference target (max |diff| = {rel:.2%} of max |y|, bf16)")

    rows = [("bf16", _tokens_per_s(bf16, tokens, device, iters)), ("bitcpm cann", _tokens_per_s(cann, tokens, device, iters))]
    print(f"device: {device}, batch {batch} x seq {seq}, hidden {config.hidden_size}, layers {config.num_layers}")
    if device == "cpu":
        print("NOTE: CPU emulator run. These timings mean nothing about Ascend performance.")
    for name, tps in rows:
        print(f"{name:>12}: {tps:12.1f} tokens/s  ({tps / rows[0][1]:.2f}x bf16)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
