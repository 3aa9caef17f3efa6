"""Serving a SmolLM-135M-shaped Llama: packed bitcpm vs fp32 / bf16 eager and fp32 inductor.

    python benchmarks/bench_serving.py [--decode-tokens 32] [--prefill 128] [--threads 2] [--out FILE.json]

Random weights (no download), a Llama built from a config shaped like SmolLM-135M: hidden
576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocab 49152, tied embeddings. Each
variant runs in its own process so its resident memory is its own. Reports prefill and
decode (KV cache) tokens/s with ratios against fp32 eager measured in the same run, weight
memory of the linear layers and of the whole model, process RSS, and for the packed model
a profile of where decode time goes (linear layers, lm_head, attention, everything else).
``packed-int8-head`` is ``pack(model, head="int8")``: the tied head and embedding as int8 (W8A8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("fp32-eager", "bf16-eager", "fp32-inductor", "packed-eager", "packed-bitcpm", "packed-int8-head")
HEAD_OPS = ("bitcpm::float_gemv_linear", "bitcpm::int8_dense_linear")  # the head's kernels as the profiler names them
SMOLLM_135M = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, max_position_embeddings=2048, tie_word_embeddings=True,
)  # fmt: skip


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _linear_weight_bytes(model) -> int:
    import torch

    import bitcompile

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, bitcompile.PackedTernaryLinear):
            total += module.packed.nbytes + module.scales.nbytes
        elif isinstance(module, torch.nn.Linear) and name != "lm_head":  # lm_head is the tied embedding
            total += module.weight.nbytes
    return total


def _run_variant(variant: str, prefill: int, decode_tokens: int, repeats: int) -> dict:
    """Runs in a child process: build, warm up, time prefill and decode."""
    import torch
    import transformers

    import bitcompile
    from bitcompile.runtime.modules import weight_nbytes

    torch.manual_seed(0)
    rss_start = _rss_mib()
    config = transformers.LlamaConfig(**SMOLLM_135M)
    model = transformers.LlamaForCausalLM(config).eval()
    if variant == "bf16-eager":
        model = model.to(torch.bfloat16)
    if variant.startswith("packed"):
        bitcompile.pack(model, head="int8" if variant == "packed-int8-head" else "float")
    forward = model
    if variant == "fp32-inductor":
        forward = torch.compile(model, dynamic=True)
    elif variant == "packed-bitcpm":
        forward = torch.compile(model, backend="bitcpm", dynamic=True)
    prompt = torch.randint(0, config.vocab_size, (1, prefill), generator=torch.Generator().manual_seed(1))

    def prefill_once():
        cache = transformers.DynamicCache(config=config)
        out = forward(input_ids=prompt, past_key_values=cache, use_cache=True)
        return out.logits, cache

    def decode(cache, logits):
        token = logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            logits = forward(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
        return token

    with torch.no_grad():
        start = time.perf_counter()
        logits, cache = prefill_once()  # warm-up (and compile)
        decode(cache, logits)
        warmup_s = time.perf_counter() - start
        prefill_times, decode_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            logits, cache = prefill_once()
            prefill_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            decode(cache, logits)
            decode_times.append(time.perf_counter() - start)
        breakdown = _decode_breakdown(forward, prefill_once, decode) if variant.startswith("packed") else None
    prefill_s, decode_s = min(prefill_times), min(decode_times)
    return {
        "variant": variant,
        "prefill_tokens_per_s": prefill / prefill_s,
        "decode_tokens_per_s": decode_tokens / decode_s,
        "prefill_ms": prefill_s * 1e3,
        "decode_ms_per_token": decode_s / decode_tokens * 1e3,
        "warmup_and_compile_s": warmup_s,
        "linear_weight_bytes": _linear_weight_bytes(model),
        "model_bytes": weight_nbytes(model),
        "rss_mib": _rss_mib(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_at_start_mib": rss_start,
        "kernel": next((m.kernel for m in model.modules() if isinstance(m, bitcompile.PackedTernaryLinear)), None),
        "decode_breakdown_ms_per_token": breakdown,
    }


def _decode_breakdown(forward, prefill_once, decode) -> dict:
    """Self CPU time per op class over one decode run, from torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    logits, cache = prefill_once()
    tokens = 8
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        token = logits[:, -1:].argmax(-1)
        for _ in range(tokens):
            logits = forward(input_ids=token, past_key_values=cache, use_cache=True).logits
            token = logits[:, -1:].argmax(-1)
    groups = {"ternary linear layers": 0.0, "lm_head (tied)": 0.0, "attention": 0.0, "everything else": 0.0}
    for event in prof.key_averages():
        name, self_ms = event.key, event.self_cpu_time_total / 1e3
        if "ternary_linear_packed" in name:
            groups["ternary linear layers"] += self_ms
        elif name in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul") or "mkl" in name or name in HEAD_OPS:
            groups["lm_head (tied)"] += self_ms
        elif "attention" in name or "sdpa" in name or "flash" in name:
            groups["attention"] += self_ms
        else:
            groups["everything else"] += self_ms
    del torch
    return {key: value / tokens for key, value in groups.items()}


def _table(rows: list[dict]) -> str:
    base = next(r for r in rows if r["variant"] == "fp32-eager")
    bf16 = next((r for r in rows if r["variant"] == "bf16-eager"), None)
    lines = [
        f"{'variant':<15} {'prefill tok/s':>13} {'x fp32':>7} {'decode tok/s':>12} {'x fp32':>7} {'x bf16':>7} "
        f"{'linear W MiB':>12} {'model MiB':>9} {'RSS MiB':>8} {'compile s':>9}"
    ]
    for r in rows:
        vs_bf16 = r["decode_tokens_per_s"] / bf16["decode_tokens_per_s"] if bf16 else float("nan")
        lines.append(
            f"{r['variant']:<15} {r['prefill_tokens_per_s']:>13.1f} {r['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:>7.2f} "
            f"{r['decode_tokens_per_s']:>12.1f} {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>7.2f} {vs_bf16:>7.2f} "
            f"{r['linear_weight_bytes'] / 2**20:>12.1f} {r['model_bytes'] / 2**20:>9.1f} {r['rss_mib']:>8.0f} "
            f"{r['warmup_and_compile_s']:>9.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default="benchmarks/results/serving.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(_run_variant(args.child, args.prefill, args.decode_tokens, args.repeats)))
        return
    if "fp32-eager" not in args.variants:
        args.variants.insert(0, "fp32-eager")
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--child", variant, "--prefill", str(args.prefill),
                   "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats),
                   "--threads", str(args.threads)]  # fmt: skip
        print(f"running {variant} ...", file=sys.stderr, flush=True)
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        if done.returncode != 0:
            raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(_table(rows))
    for r in rows:
        if r["decode_breakdown_ms_per_token"]:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r["decode_breakdown_ms_per_token"].items())
            print(f"{r['variant']} decode ms/token by op class: {parts}")
    import torch

    record = {
        "benchmark": "serving_smollm135m_shape",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_flags": _cpu_flags(),
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode_tokens,
        "results": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


def _cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))]
    except OSError:
        pass
    return []


if __name__ == "__main__":
    main()
