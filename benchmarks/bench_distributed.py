"""Step time, memory and collective bytes per rank of ternary training: DDP, FSDP2, FSDP2 + 2-bit all-gather, TP.

    python benchmarks/bench_distributed.py [--parallel ddp,fsdp,fsdp-2bit,tp] [--ranks 1,2] [--steps 8]
        [--group-size -1] [--param-dtype float32] [--inner aot_eager]
        [--out benchmarks/results/distributed.json] [--smoke]

``fsdp-2bit`` is FSDP2 with precomputed per-tensor scales whose all-gathers move 2-bit codes
(``enable_two_bit_all_gather``; its ``group_size`` is always ``tensor``); ``tp`` is the Megatron
plan over all ranks (every rank trains on the same batch). Bytes per step are the payloads of
the collectives one forward + backward issues (``count_collectives``).

Weak scaling: every rank trains the same per-rank batch of TinyLlama (hidden 256, 4 layers
by default) with ``backend="bitcpm"``; the script starts the ranks itself (gloo on CPU, the
way ``torchrun`` starts them). Per rank it reports the median step time after warm-up, the
peak resident memory of the process (``ru_maxrss``: includes Python, torch and the compiler,
so only its difference between runs means anything), the bytes of parameters and optimizer
state the rank holds (FSDP2 shards both), and the collectives one step issues.

**The numbers are for the scaling shape only** (does FSDP2 halve the per-rank state, does the
step time stay flat from 1 to 2 ranks): two gloo processes on a shared 2-core CPU are not a
cluster, and the step time includes gloo over loopback TCP.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    from bitcompile.distributed import compile_module, count_collectives
    from bitcompile.models.tiny_llama import TinyLlama, TinyLlamaConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group_size = args.group_size if args.group_size == "tensor" else int(args.group_size)
    options = {"group_size": group_size, "inner": args.inner}
    torch.manual_seed(0)
    config = TinyLlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                             num_layers=args.layers, num_heads=4, max_seq_len=args.seq, tie_embeddings=False)  # fmt: skip
    model = TinyLlama(config)
    two_bit = args.parallel == "fsdp-2bit"
    if two_bit:  # precomputed per-tensor scales, refreshed after every optimizer step
        from bitcompile.distributed import enable_tensor_scales, enable_two_bit_all_gather, precompute_tensor_scales

        options["group_size"] = "tensor"
        enable_tensor_scales(model, options, auto=False)
        enable_two_bit_all_gather(model)
    data_rank = rank
    if args.parallel == "tp":  # Megatron plan over all ranks; every rank trains on the same batch
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        from bitcompile.distributed import megatron_plan

        parallelize_module(model, init_device_mesh("cpu", (world,)), megatron_plan(model))
        forward = torch.compile(model, backend="bitcpm", options=options)
        data_rank = 0
    elif args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        # the rope tables are constants: skip DDP's per-forward buffer broadcast (keyword renamed in torch 2.13)
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters else "broadcast_buffers"
        forward = torch.compile(DDP(model, **{sync: False}), backend="bitcpm", options=options)
    else:
        from torch.distributed.fsdp import fully_shard

        from torch.distributed.fsdp import MixedPrecisionPolicy

        mp = MixedPrecisionPolicy(param_dtype=getattr(torch, args.param_dtype), reduce_dtype=torch.float32)
        for layer in model.layers:
            compile_module(layer, options)
            fully_shard(layer, mp_policy=mp)
        compile_module(model.lm_head, options)
        fully_shard(model, mp_policy=mp)
        forward = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(data_rank)
    times, collectives, collective_bytes = [], {}, {}
    if two_bit:
        precompute_tensor_scales(model)
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, 256, (args.batch, args.seq + 1), generator=gen)
        dist.barrier()
        start = time.perf_counter()
        if step == args.warmup:
            with count_collectives() as counts:
                logits = forward(tokens[:, :-1])
                F.cross_entropy(logits.reshape(-1, 256).float(), tokens[:, 1:].reshape(-1)).backward()
            collectives, collective_bytes = dict(counts), dict(counts.bytes)
        else:
            logits = forward(tokens[:, :-1])
            F.cross_entropy(logits.reshape(-1, 256).float(), tokens[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
        if two_bit:
            precompute_tensor_scales(model)  # one all-reduce for all layers, counted outside forward + backward
        # warm-up steps compile (and DDP rebuilds its buckets in step 1); the counted step runs under the profiler
        if step > args.warmup:
            times.append(time.perf_counter() - start)

    def local_bytes(t) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    result = {
        "rank": rank,
        "world": world,
        "median_step_s": statistics.median(times),
        "step_times_s": times,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_bytes": sum(local_bytes(p) for p in model.parameters()),
        "optimizer_state_bytes": sum(
            local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)
        ),
        "collectives_per_step": collectives,
        "collective_bytes_per_step": collective_bytes,
    }
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def launch(args: argparse.Namespace, parallel: str, ranks: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        cmd = [sys.executable, __file__, "--worker", "--result-dir", tmp, "--parallel", parallel]
        for key in ("steps", "warmup", "batch", "seq", "hidden", "layers", "group_size", "inner", "param_dtype"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        procs = []
        for rank in range(ranks):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                       WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        for proc in procs:
            try:
                _, err = proc.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise SystemExit(f"{parallel} x{ranks}: timed out after {args.timeout}s")
            if proc.returncode:
                raise SystemExit(f"{parallel} x{ranks} failed:\n{err[-3000:]}")
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(ranks)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", default="ddp,fsdp")
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--group-size", default="-1")
    p.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--param-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="FSDP2 MixedPrecisionPolicy(param_dtype=...): the dtype the float all-gather moves")  # fmt: skip
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", default="benchmarks/results/distributed.json")
    p.add_argument("--smoke", action="store_true", help="tiny model, 3 steps: checks the script runs")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.smoke:
        args.steps, args.warmup, args.hidden, args.layers, args.seq, args.batch = 3, 2, 64, 2, 32, 2
    import torch

    runs = []
    for parallel in args.parallel.split(","):
        for ranks in (int(r) for r in args.ranks.split(",")):
            per_rank = launch(args, parallel, ranks)
            runs.append({"parallel": parallel, "ranks": ranks, "per_rank": per_rank})
            worst = max(r["median_step_s"] for r in per_rank)
            print(
                f"{parallel:4s} x{ranks}: step {worst * 1e3:8.1f} ms (slowest rank median)  "
                f"params+optimizer per rank {(per_rank[0]['param_bytes'] + per_rank[0]['optimizer_state_bytes']) / 2**20:6.2f} MiB  "
                f"peak RSS {max(r['peak_rss_mib'] for r in per_rank):7.1f} MiB  collectives/step {per_rank[0]['collectives_per_step']}  "
                f"bytes/step {per_rank[0]['collective_bytes_per_step']}"
            )
    out = {
        "note": "CPU, gloo over loopback, shared cores: for the scaling shape only, not absolute performance",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "config": {k: getattr(args, k) for k in ("steps", "warmup", "batch", "seq", "hidden", "layers", "group_size", "inner", "param_dtype")},
        "runs": runs,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
