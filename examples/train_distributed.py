"""Ternary (1.58-bit) training of TinyLlama on torch.distributed: DDP, FSDP2, tensor parallelism, or FSDP2 x TP.

    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel fsdp --steps 50
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel ddp --group-size 64
    torchrun --nproc-per-node 2 examples/train_distributed.py --group-size tensor --precompute-scales
    torchrun --nproc-per-node 2 examples/train_distributed.py --group-size tensor --precompute-scales --two-bit-all-gather
    torchrun --nproc-per-node 2 examples/train_distributed.py --parallel tp
    torchrun --nproc-per-node 4 examples/train_distributed.py --parallel fsdp-tp --tp 2

The same script runs on CPU (gloo), CUDA (nccl) and Ascend (hccl, with torch_npu): the
backend is picked from the device. ``--checkpoint DIR`` saves the sharded latent weights and
optimizer state with ``torch.distributed.checkpoint`` at the end and resumes from DIR when it
already holds one; ``--pack OUT`` gathers the trained model on rank 0, packs it to 2-bit
(``bitcompile.pack``) and saves it with ``bitcompile.save_packed``. See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import bitcompile
from bitcompile.data.synthetic_text import CharTokenizer, make_text, random_batches
from bitcompile.distributed import (
    check_options,
    check_plan,
    compile_module,
    count_collectives,
    enable_tensor_scales,
    enable_two_bit_all_gather,
    megatron_plan,
    precompute_tensor_scales,
    tensor_scale_mode,
)
from bitcompile.models.tiny_llama import TinyLlama, TinyLlamaConfig


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parallel", choices=("ddp", "fsdp", "tp", "fsdp-tp"), default="fsdp",
                   help="tp: Megatron plan over all ranks (every rank sees the same batch); fsdp-tp: FSDP2 x TP (--tp ranks)")  # fmt: skip
    p.add_argument("--tp", type=int, default=2, help="fsdp-tp: tensor-parallel ranks per data-parallel replica")
    p.add_argument("--two-bit-all-gather", action="store_true",
                   help="fsdp with --group-size tensor --precompute-scales: FSDP2 all-gathers 2-bit codes")  # fmt: skip
    p.add_argument("--group-size", default="-1", help="-1 (per row), tensor, or a group length such as 64")
    p.add_argument("--precompute-scales", action="store_true",
                   help="group_size=tensor only: global absmeans from the fp32 shards, one all-reduce per step")  # fmt: skip
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=8, help="sequences per rank")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--checkpoint", help="DCP directory: resume from it if present, save to it at the end")
    p.add_argument("--pack", help="write the packed 2-bit model here (rank 0)")
    p.add_argument("--timeout", type=float, default=300, help="collective timeout in seconds")
    return p.parse_args()


def setup() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))), "nccl"
        torch.cuda.set_device(device)
    elif hasattr(torch, "npu") and torch.npu.is_available():  # torch_npu
        device, backend = torch.device("npu", int(os.environ.get("LOCAL_RANK", 0))), "hccl"
        torch.npu.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    return device, backend


def no_buffer_sync() -> dict:
    """DDP kwargs that skip the per-forward buffer broadcast (the keyword changed in torch 2.13)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def main() -> None:
    args = parse_args()
    device, backend = setup()
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    group_size = args.group_size if args.group_size == "tensor" else int(args.group_size)
    options = {"group_size": group_size, "inner": args.inner}

    tokenizer = CharTokenizer(make_text(200_000))
    tokens = tokenizer.encode(make_text(200_000))
    torch.manual_seed(0)  # every rank builds the same initial model
    config = TinyLlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=128, intermediate_size=344,
                             num_layers=4, num_heads=4, max_seq_len=args.seq, tie_embeddings=False)  # fmt: skip
    model = TinyLlama(config).to(device)
    two_bit = args.two_bit_all_gather
    if two_bit and (args.parallel != "fsdp" or not args.precompute_scales):
        raise SystemExit("--two-bit-all-gather needs --parallel fsdp --group-size tensor --precompute-scales")
    if args.precompute_scales and args.parallel in ("tp", "fsdp-tp"):
        raise SystemExit("--precompute-scales is for ddp / fsdp: under TP a per-tensor scale is one scalar all-reduce in the graph")
    if args.precompute_scales:
        # one all-reduce per step for all per-tensor layers; with the 2-bit all-gather we call it ourselves
        enable_tensor_scales(model, options, auto=not two_bit)
    if two_bit:
        enable_two_bit_all_gather(model)
    check_options(options, model)  # all ranks must agree, or all fail here with the same message
    data_rank, data_world = rank, world  # which slice of the global batch this rank trains on

    if args.parallel in ("tp", "fsdp-tp"):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.parallel import parallelize_module

        tp = world if args.parallel == "tp" else args.tp
        if world % tp:
            raise SystemExit(f"--tp {tp} does not divide the {world} ranks")
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        plan = megatron_plan(model)
        check_plan(plan)  # all ranks must parallelize the same layers the same way
        parallelize_module(model, mesh["tp"], plan)
        data_rank, data_world = mesh["dp"].get_local_rank(), world // tp  # TP ranks of a replica share a batch
    if args.parallel == "tp":
        forward = torch.compile(model, backend="bitcpm", options=options)
    elif args.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        wrapped = DDP(model, **no_buffer_sync())  # the rope tables are constants
        forward = torch.compile(wrapped, backend="bitcpm", options=options)
    else:
        from torch.distributed.fsdp import fully_shard

        dp_mesh = mesh["dp"] if args.parallel == "fsdp-tp" else None
        for layer in model.layers:  # compile per block, then shard it
            compile_module(layer, options)
            fully_shard(layer, mesh=dp_mesh)
        compile_module(model.lm_head, options)
        fully_shard(model, mesh=dp_mesh)
        forward = model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    start_step = 0
    if args.checkpoint and os.path.exists(os.path.join(args.checkpoint, ".metadata")):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=args.checkpoint)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start_step = int(state["step"])
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {start_step}")

    if rank == 0:
        print(f"{args.parallel} on {world} x {device.type} ({backend}); scales: {tensor_scale_mode(model, options)}")
    batches = list(random_batches(tokens, args.batch * data_world, args.seq, args.steps, seed=0))
    if two_bit:
        precompute_tensor_scales(model)  # the 2-bit all-gather makes its codes with these scales
    for step in range(start_step, args.steps):
        inputs, targets = (t[data_rank * args.batch : (data_rank + 1) * args.batch].to(device) for t in batches[step])
        report = step % 10 == 0 or step == args.steps - 1
        begin = time.perf_counter()
        with count_collectives() if report else contextlib.nullcontext({}) as collectives:
            logits = forward(inputs)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if two_bit:
            precompute_tensor_scales(model)  # after every optimizer.step(): one all-reduce for all layers
        seconds = time.perf_counter() - begin
        if rank == 0 and report:  # (the profiler that counts collectives slows these steps a little)
            sizes = f" ({getattr(collectives, 'total_bytes', 0) / 1024:.1f} KiB)" if report else ""
            print(f"step {step:4d}  loss {loss.item():.4f}  {seconds * 1e3:7.1f} ms  collectives {dict(collectives)}{sizes}")

    if args.checkpoint:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(model, optimizer)
        dcp.save({"model": msd, "optim": osd, "step": torch.tensor(args.steps)}, checkpoint_id=args.checkpoint)
    if args.pack:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            plain = TinyLlama(config)
            plain.load_state_dict(full)
            packed = bitcompile.pack(plain, bitcompile.TernaryConfig.from_options({"group_size": group_size}))
            bitcompile.save_packed(packed, args.pack)
            print(f"packed model written to {args.pack}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
