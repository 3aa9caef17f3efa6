"""Decode speed of a packed MoE (ternary experts) against its float version, in one run.

    python benchmarks/bench_moe.py [--decode-tokens 32] [--prefill 16] [--threads 1] [--out FILE.json]

A Mixtral-shaped model with random weights (no download): hidden 512, 8 experts of
intermediate 768, top-2, 4 layers, 8 heads / 2 KV heads, vocab 4096. The float model runs
each of transformers' experts implementations (``grouped_mm``, its default; ``batched_mm``;
``eager``, a loop over the experts hit); the packed one is
``bitcompile.pack(model)``: every expert 2-bit, the routed tokens through one packed-kernel
call per active expert (:class:`bitcompile.runtime.experts.PackedTernaryExperts`).

Reported, each as the best of ``--repeats``: decode tokens/s (KV cache, one token per step)
and the time of one experts module on one token, wall and CPU seconds, with ratios
packed / float measured in the same process; and the expert weights' bytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

MOE = dict(
    vocab_size=4096, hidden_size=512, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
)  # fmt: skip
#: transformers' experts implementations the float model is timed with (grouped_mm is its default)
FLOAT_IMPLEMENTATIONS = ("grouped_mm", "batched_mm", "eager")


def _expert_bytes(model) -> int:
    import torch

    from bitcompile.runtime.experts import PackedTernaryExperts

    total = 0
    for module in model.modules():
        if isinstance(module, PackedTernaryExperts):
            total += sum(b.nbytes for b in module.buffers())
        elif isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter):
            total += module.gate_up_proj.nbytes + module.down_proj.nbytes
    return total


def _best(fn, repeats: int) -> tuple[float, float]:
    """Best (wall, cpu) seconds of ``fn()`` over ``repeats`` runs."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall, best_cpu = min(best_wall, time.perf_counter() - wall), min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def _decode(model, config, prompt, decode_tokens: int, repeats: int) -> tuple[float, float, list[int]]:
    """(wall s, cpu s) per decode token and the greedy tokens, best of ``repeats`` generations."""
    import torch
    import transformers

    tokens: list[int] = []

    def generate():
        tokens.clear()
        cache = transformers.DynamicCache(config=config)
        logits = model(prompt, cache=cache, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            tokens.append(int(token))
            token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)

    with torch.no_grad():
        generate()  # warm-up (prepared kernel calls, allocator)
        prefill_only = _best(lambda: model(prompt, cache=transformers.DynamicCache(config=config)), repeats)
        wall, cpu = _best(generate, repeats)
    return (wall - prefill_only[0]) / decode_tokens, (cpu - prefill_only[1]) / decode_tokens, list(tokens)


def _experts_call(experts, hidden: int, repeats: int) -> tuple[float, float]:
    """(wall s, cpu s) of one experts module on one token routed to experts 1 and 6 (mean of 200 calls)."""
    import torch

    x = torch.randn(1, hidden)
    index, weights = torch.tensor([[1, 6]]), torch.tensor([[0.6, 0.4]])
    calls = 200
    with torch.no_grad():
        experts(x, index, weights)
        wall, cpu = _best(lambda: [experts(x, index, weights) for _ in range(calls)], repeats)
    return wall / calls, cpu / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    # 1 by default: on a loaded machine torch's 2-thread fp32 GEMMs spin-wait and the float
    # baseline came out 10-20x slower (1.1 tok/s vs 24 at 1 thread), which would flatter pack
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/results/moe.json")
    args = parser.parse_args()

    import torch
    import transformers

    import bitcompile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = transformers.MixtralConfig(**MOE)
    float_model = transformers.MixtralForCausalLM(config).eval()
    packed_model = bitcompile.pack(copy.deepcopy(float_model))
    prompt = torch.randint(0, config.vocab_size, (1, args.prefill), generator=torch.Generator().manual_seed(1))

    variants = {}
    for implementation in FLOAT_IMPLEMENTATIONS:  # transformers' experts implementations, each a float baseline
        variants[f"float-{implementation}"] = float_model
    variants["packed"] = packed_model
    rows = {}
    for variant, model in variants.items():
        if variant.startswith("float-"):
            model.set_experts_implementation(variant.removeprefix("float-"))
        decode_wall, decode_cpu, tokens = _decode(model, config, prompt, args.decode_tokens, args.repeats)
        layer_wall, layer_cpu = _experts_call(model.model.layers[0].mlp.experts, config.hidden_size, args.repeats)
        rows[variant] = {
            "decode_tokens_per_s": 1 / decode_wall, "decode_cpu_s_per_token": decode_cpu,
            "experts_call_us": layer_wall * 1e6, "experts_call_cpu_us": layer_cpu * 1e6,
            "expert_weight_bytes": _expert_bytes(model), "tokens": tokens,
        }  # fmt: skip
        print(f"{variant:>16}: decode {1 / decode_wall:7.1f} tok/s ({decode_cpu * 1e3:.2f} CPU ms/token); "
              f"one experts call {layer_wall * 1e6:7.1f} us ({layer_cpu * 1e6:.1f} CPU us); "
              f"expert weights {_expert_bytes(model) / 2**20:.1f} MiB")  # fmt: skip
    packed = rows["packed"]
    ratios = {}
    for variant, row in rows.items():
        if variant == "packed":
            continue
        ratios[f"packed_vs_{variant}"] = {
            "decode_speedup": packed["decode_tokens_per_s"] / row["decode_tokens_per_s"],
            "decode_cpu_speedup": row["decode_cpu_s_per_token"] / packed["decode_cpu_s_per_token"],
            "experts_call_speedup": row["experts_call_us"] / packed["experts_call_us"],
            "experts_call_cpu_speedup": row["experts_call_cpu_us"] / packed["experts_call_cpu_us"],
            "expert_weight_ratio": row["expert_weight_bytes"] / packed["expert_weight_bytes"],
        }
        print(f"packed vs {variant}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios[f"packed_vs_{variant}"].items()))
    record = {
        "benchmark": "bench_moe", "model": {"architecture": "Mixtral (random weights)", **MOE},
        "prefill": args.prefill, "decode_tokens": args.decode_tokens, "repeats": args.repeats, "threads": args.threads,
        "packed_serving": "one packed-kernel call per active expert (PackedTernaryExperts)",
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "results": rows, "ratios": ratios,
        "note": "measured on a shared 2-core machine under load; ratios are from the same process",
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
