"""QAT training step of the tiny Llama decoder: bitcpm vs float baselines, measured in one run (issue 3).

    python benchmarks/bench_qat.py [--threads 1,2] [--repeats 5] [--hidden 1024 --intermediate 2816
        --layers 2 --heads 8 --vocab 512 --batch 8 --seq 256] [--precisions fp32,bf16,int8]
        [--bf16-model-precisions int8] [--autocast-precisions int8] [--variants fp32_eager,bf16_eager,...]
        [--out benchmarks/results/qat.json]

One step = forward + cross-entropy + backward + ``torch.optim.AdamW.step`` on ``batch * seq``
tokens (default 8 x 256 = 2048). Variants, each in its own worker process (so its memory is
its own), all built from the same seeded fp32 model:

- ``fp32_eager``: the float model, eager.
- ``bf16_eager``: the model cast to bf16 (parameters, activations and AdamW state in bf16;
  pure-bf16 training, the fastest bf16 setting in eager PyTorch on CPU).
- ``fp32_inductor``: ``torch.compile(model)`` (inductor).
- ``fakequant_eager``: tests/reference_impl.py's eager fake-quant STE reference (every
  Linear except the tied lm_head through ``w + (q(w) - w).detach()`` and int8 activations).
- ``bitcpm[<p>]``: ``torch.compile(model, backend="bitcpm", options={"backward_precision": p})``
  (inner compiler inductor, target auto = the C/oneDNN "cpu" kernels), for each ``p`` asked.
- ``bitcpm_bf16model[<p>]`` (``--bf16-model-precisions``): the same on the model cast to bf16,
  i.e. the bf16 eager baseline's model with its Linear layers made ternary.
- ``autocast_eager``: the fp32 model under
  ``torch.autocast("cpu", torch.bfloat16)``, PyTorch's mixed-precision recipe (fp32 master
  weights and AdamW, bf16 matmuls and attention).
- ``bitcpm_autocast[<p>]`` (``--autocast-precisions``): bitcpm on the fp32 model under that
  autocast: the ternary layers stay int8 x ternary, attention and the float head run bf16.

Workers are started per thread count (inductor fixes the OpenMP thread count at compile
time), warmed up (compile + ``--warmup`` steps), then driven round-robin: every round runs
one timed step in each worker in turn, so a change of machine load hits all variants alike.
The reported time is the median over ``--repeats`` rounds. Peak memory: the kernel's
high-water mark of the worker's resident set (``VmHWM``), reset with
``/proc/self/clear_refs`` just before the timed steps, so compile-time memory is excluded;
also the part of it above the resident set right before the first timed step, after
``malloc_trim`` (what one step adds on top of weights, optimizer state and the process).

Prints a table (ms/step, ratios to bf16 eager and fp32 eager, peak memory) and writes JSON
with the raw step times, CPU model and flags, thread counts, load average and versions.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_VARIANTS = ("fp32_eager", "bf16_eager", "autocast_eager", "fp32_inductor", "fakequant_eager")


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "logical_cpus": os.cpu_count()}
    try:
        first = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
        fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in first.splitlines() if ":" in line)}
        info.update(model=fields.get("model name"), family=fields.get("cpu family"), model_id=fields.get("model"))
        info["flags"] = sorted(f for f in fields.get("flags", "").split() if f.startswith(("avx", "fma", "gfni", "amx")))
    except OSError:
        pass
    return info


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _build(variant: str, args: argparse.Namespace):
    import torch

    from bitcompile.models import TinyLlama, TinyLlamaConfig

    torch.manual_seed(0)
    config = TinyLlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_layers=args.layers, num_heads=args.heads, max_seq_len=args.seq,
    )  # fmt: skip
    model = TinyLlama(config)
    forward = model
    if variant == "bf16_eager":
        model = model.to(torch.bfloat16)
        forward = model
    elif variant == "fp32_inductor":
        forward = torch.compile(model)
    elif variant == "fakequant_eager":
        sys.path.insert(0, str(ROOT / "tests"))
        import reference_impl

        forward = reference_impl.swap_linears_for_fake_quant(model)  # skips the tied lm_head, as bitcpm does
    elif variant.startswith("bitcpm"):
        precision = variant[variant.index("[") + 1 : -1]
        if variant.startswith("bitcpm_bf16model"):
            model = model.to(torch.bfloat16)
        forward = torch.compile(model, backend="bitcpm", options={"backward_precision": precision})
    elif variant not in ("fp32_eager", "autocast_eager"):
        raise ValueError(f"unknown variant {variant!r}")
    return model, forward


def _worker(variant: str, threads: int, args: argparse.Namespace, conn) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    rss_after_import = _status_kib("VmRSS")
    model, forward = _build(variant, args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    autocast = "autocast" in variant

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = forward(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        return loss.item()

    t0 = time.perf_counter()
    losses = [step()]
    first_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        losses.append(step())
    _malloc_trim()  # hand freed heap pages back, so the idle RSS is live memory only
    rss_idle = _status_kib("VmRSS")
    hwm_reset = _reset_peak_rss()
    conn.send(("ready", first_s))
    times = []
    while True:
        cmd = conn.recv()
        if cmd != "step":
            break
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
        conn.send(("done", times[-1]))
    conn.send(
        {
            "variant": variant,
            "threads": threads,
            "times_ms": [round(s * 1e3, 2) for s in times],
            "median_ms": statistics.median(times) * 1e3 if times else float("nan"),
            "first_step_s": round(first_s, 2),
            "losses": [round(v, 4) for v in losses],
            "rss_after_import_mib": rss_after_import / 1024,
            "rss_idle_mib": rss_idle / 1024,
            "peak_rss_mib": _status_kib("VmHWM") / 1024 if hwm_reset else float("nan"),
            "step_peak_above_idle_mib": (_status_kib("VmHWM") - rss_idle) / 1024 if hwm_reset else float("nan"),
            "params": sum(p.numel() for p in model.parameters()),
        }
    )
    conn.close()


def run_threads(variants: list[str], threads: int, args: argparse.Namespace) -> list[dict]:
    ctx = mp.get_context("spawn")
    workers = {}
    for v in variants:  # start and warm up one at a time: compiles do not overlap
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(v, threads, args, child), daemon=True)
        proc.start()
        msg = parent.recv()
        print(f"  [T={threads}] {v}: ready (first step {msg[1]:.1f} s)", flush=True)
        workers[v] = (proc, parent)
    for r in range(args.repeats):
        order = variants if r % 2 == 0 else variants[::-1]  # alternate the order: no variant always runs first
        for v in order:
            workers[v][1].send("step")
            workers[v][1].recv()
        print(f"  [T={threads}] round {r + 1}/{args.repeats} done, load {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for v in variants:
        proc, conn = workers[v]
        conn.send("stop")
        results.append(conn.recv())
        proc.join()
    return results


def table(results: list[dict]) -> str:
    lines = [
        f"{'T':>2} {'variant':<24} {'ms/step':>9} {'/bf16':>7} {'/autocast':>9} {'/fp32':>7} {'peak MiB':>9} "
        f"{'step+ MiB':>9}  loss first->last",
    ]
    for threads in sorted({r["threads"] for r in results}):
        rows = [r for r in results if r["threads"] == threads]
        by = {r["variant"]: r for r in rows}
        bf16, fp32 = by.get("bf16_eager", {}).get("median_ms"), by.get("fp32_eager", {}).get("median_ms")
        autocast = by.get("autocast_eager", {}).get("median_ms")
        for r in rows:
            t = r["median_ms"]
            rb = f"{t / bf16:.2f}" if bf16 else "-"
            ra = f"{t / autocast:.2f}" if autocast else "-"
            rf = f"{t / fp32:.2f}" if fp32 else "-"
            lines.append(
                f"{threads:>2} {r['variant']:<24} {t:>9.1f} {rb:>7} {ra:>9} {rf:>7} {r['peak_rss_mib']:>9.0f} "
                f"{r['step_peak_above_idle_mib']:>9.0f}  {r['losses'][0]:.3f}->{r['losses'][-1]:.3f}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--precisions", default="fp32,bf16,int8", help="bitcpm backward_precision values to run")
    ap.add_argument(
        "--bf16-model-precisions", default="int8", help="also run bitcpm on the bf16-cast model with these backward precisions"
    )
    ap.add_argument(
        "--autocast-precisions", default="int8", help="also run bitcpm under bf16 autocast with these backward precisions"
    )
    ap.add_argument(
        "--variants", default=",".join(BASE_VARIANTS), help="baselines to run (comma list)"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "qat.json"))
    args = ap.parse_args(argv)

    import torch

    import bitcompile
    from bitcompile.kernels import cpu

    variants = [v for v in args.variants.split(",") if v] + [f"bitcpm[{p}]" for p in args.precisions.split(",") if p]
    variants += [f"bitcpm_bf16model[{p}]" for p in args.bf16_model_precisions.split(",") if p]
    variants += [f"bitcpm_autocast[{p}]" for p in args.autocast_precisions.split(",") if p]
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(
        f"tiny Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads, "
        f"vocab {args.vocab} (tied lm_head, kept float by bitcpm); {args.batch}x{args.seq} = "
        f"{args.batch * args.seq} tokens/step; AdamW; cpu kernels {'C/' + cpu.isa() if cpu.available() else 'reference'}",
        flush=True,
    )
    load_before = os.getloadavg()
    results = []
    for threads in thread_counts:
        results += run_threads(variants, threads, args)
    load_after = os.getloadavg()
    print(table(results))
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (on {os.cpu_count()} logical CPUs)")
    out = {
        "benchmark": "qat_step",
        "command": "python benchmarks/bench_qat.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "heads", "vocab", "batch", "seq")},
        "tokens_per_step": args.batch * args.seq,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "threads": thread_counts,
        "cpu": cpu_info(),
        "kernel_isa": cpu.isa() if cpu.available() else "reference",
        "torch": torch.__version__,
        "bitcompile": getattr(bitcompile, "__version__", None),
        "python": platform.python_version(),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
