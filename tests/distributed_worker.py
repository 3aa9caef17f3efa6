"""One rank of the distributed tests (tests/test_distributed.py starts two of these).

Started like ``torchrun`` starts a script: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` in the environment, gloo on CPU. ``python tests/distributed_worker.py
SCENARIO OUT_DIR`` writes ``OUT_DIR/rank{r}.json`` with what the test asserts on.

Scenarios: ``train`` (DDP and FSDP2 vs 1-rank training on the concatenated batch, for each
scale mode, with collectives counted per step; ranks with different options), ``checkpoint`` (DCP save / load / resume,
then ``bitcompile.pack`` of the gathered model), ``die`` / ``stall`` / ``die_tp`` (rank 1 dies
or stops answering mid-training, under DDP or tensor parallelism; rank 0 must error out within
the collective timeout), ``tp`` (Megatron-plan tensor parallelism vs 1 process, for each scale
mode; a group size that straddles shards; mismatched plans), ``two_bit`` (FSDP2 float vs 2-bit
all-gather, with bytes per step). ``train`` first checks that ranks given different options all raise.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import bitcompile
from bitcompile.backend import observe_compilations
from bitcompile.distributed import (
    OptionsMismatchError,
    check_options,
    compile_module,
    count_collectives,
    enable_tensor_scales,
    precompute_tensor_scales,
)
from bitcompile.models.tiny_llama import TinyLlama, TinyLlamaConfig

MODEL = TinyLlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, tie_embeddings=False)
PER_RANK_BATCH, SEQ, LR = 2, 8, 3e-3
#: Layers the compiler rewrites in MODEL: 2 decoder layers x 7 projections + lm_head.
LINEARS = sorted(n for n, m in TinyLlama(MODEL).named_modules() if isinstance(m, nn.Linear))


def no_buffer_sync() -> dict:
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    params = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def options(group_size) -> dict:
    # float_roles=[]: these runs check every linear, the untied lm_head included, trains ternary alike
    return {"group_size": group_size, "inner": "aot_eager", "target": "reference", "float_roles": []}


def batch(step: int, world: int) -> torch.Tensor:
    """The global batch of ``step``: ``world * PER_RANK_BATCH`` sequences of SEQ + 1 tokens."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, MODEL.vocab_size, (world * PER_RANK_BATCH, SEQ + 1), generator=g)


def loss_fn(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def new_model(seed: int = 0) -> TinyLlama:
    torch.manual_seed(seed)
    return TinyLlama(MODEL)


def shard(model: TinyLlama, opts: dict) -> nn.Module:
    """FSDP2 on the decoder layers and the root; each layer and the head compiled (per-block)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        compile_module(layer, opts)
        fully_shard(layer)
    compile_module(model.lm_head, opts)  # a bare nn.Linear: module.compile() would compile nothing
    fully_shard(model)
    return model


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        name = name.removeprefix("module.").replace("_orig_mod.", "")
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
    return out


def train(model, step_fn_model, world: int, rank: int, steps: int, count_step: int | None = None):
    """``steps`` AdamW steps on this rank's slice of each global batch; (local losses, collectives, grads seen)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, counted, grads = [], None, {}
    for step in range(steps):
        tokens = batch(step, world)[rank * PER_RANK_BATCH : (rank + 1) * PER_RANK_BATCH]
        if step == count_step:
            with count_collectives() as counts:
                loss = loss_fn(step_fn_model, tokens)
                loss.backward()
            counted = dict(counts)
        else:
            loss = loss_fn(step_fn_model, tokens)
            loss.backward()
        if step == 0:
            grads = {
                n.removeprefix("module.").removesuffix(".weight"): float(_local(p.grad).abs().sum())
                for n, p in model.named_parameters()
                if p.grad is not None
            }
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, counted, grads


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def reference_run(group_size, precomputed: bool, steps: int, world: int) -> dict:
    """1 process, no wrapper: the whole model compiled, trained on the concatenated batch."""
    torch._dynamo.reset()
    model = new_model()
    if precomputed:
        enable_tensor_scales(model, options(group_size))
    compiled = torch.compile(model, backend="bitcpm", options=options(group_size))
    losses = []
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in range(steps):
        loss = loss_fn(compiled, batch(step, world))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "weights": {k: v.tolist() for k, v in full_weights(model).items()}}


RUNS = [  # (wrapper, group_size, precomputed tensor scales)
    ("ddp", -1, False),
    ("ddp", "tensor", True),
    ("fsdp", -1, False),
    ("fsdp", 32, False),
    ("fsdp", "tensor", False),
    ("fsdp", "tensor", True),
]
STEPS = 3


def scenario_train(rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    mismatch = scenario_mismatch(rank, world)  # first: a bad world must fail before any training
    results = []
    for wrapper, group_size, precomputed in RUNS:
        torch._dynamo.reset()
        opts = options(group_size)
        model = new_model()
        if precomputed:
            enable_tensor_scales(model, opts)
        check_options(opts, model)
        rewritten: set[str] = set()

        def keep(record, rewritten=rewritten):
            rewritten.update(d.name for d in record.layers if d.rewritten)

        with observe_compilations(keep):
            if wrapper == "ddp":
                ddp = DDP(model, **no_buffer_sync())  # the rope tables are constants
                losses, counted, grads = train(ddp, torch.compile(ddp, backend="bitcpm", options=opts), world, rank, STEPS, STEPS - 1)
            else:
                shard(model, opts)
                losses, counted, grads = train(model, model, world, rank, STEPS, STEPS - 1)
        scale_collectives = model._bitcpm_tensor_scales.collectives if precomputed else 0
        scale_error = 0.0
        if precomputed:  # the buffers hold the global absmean of the full fp32 weights
            precompute_tensor_scales(model)
            for name in model._bitcpm_tensor_scales.names:
                layer = model.get_submodule(name)
                full = full_weights(layer)["weight"]
                exact = full.double().abs().mean()
                scale_error = max(scale_error, float((layer.weight_scale.double() - exact).abs() / exact))
        gathered = [None] * world
        dist.all_gather_object(gathered, losses)
        weights = full_weights(model)
        results.append(
            {
                "wrapper": wrapper,
                "group_size": group_size,
                "precomputed": precomputed,
                "mean_losses": [sum(x) / world for x in zip(*gathered)],
                "collectives_step": counted,
                "scale_collectives_total": scale_collectives,
                "scale_vs_global_absmean": scale_error,
                "rewritten": sorted(rewritten),
                "grads": grads,
                "weights": {k: v.tolist() for k, v in weights.items()} if rank == 0 else {},
            }
        )
    # The 1-process references, split over the two ranks so they run in parallel.
    refs = {i: reference_run(gs, pre, STEPS, world) for i, (_, gs, pre) in enumerate(RUNS) if i % world == rank}
    all_refs: list = [None] * world
    dist.all_gather_object(all_refs, refs)
    merged = {i: r for part in all_refs for i, r in part.items()}
    if rank == 0:
        for i, result in enumerate(results):
            result["reference"] = merged[i]
    return {"runs": results, "steps": STEPS, "mismatch": mismatch}


def scenario_checkpoint(rank: int, world: int, out: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_state_dict,
    )

    opts = options("tensor")
    ckpt = out / "ckpt"

    def build(seed: int):
        torch._dynamo.reset()
        model = new_model(seed)
        enable_tensor_scales(model, opts)
        check_options(opts, model)
        shard(model, opts)
        return model, torch.optim.AdamW(model.parameters(), lr=LR)

    def step(model, opt, i: int) -> float:
        tokens = batch(i, world)[rank * PER_RANK_BATCH : (rank + 1) * PER_RANK_BATCH]
        loss = loss_fn(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return loss.item()

    model, opt = build(0)
    first = [step(model, opt, i) for i in range(2)]
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(ckpt))
    uninterrupted = [step(model, opt, i) for i in range(2, 4)]

    model2, opt2 = build(123)  # other initial weights: only the checkpoint can make it match
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=str(ckpt))
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    resumed = [step(model2, opt2, i) for i in range(2, 4)]

    full = get_model_state_dict(model2, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    result = {"first": first, "uninterrupted": uninterrupted, "resumed": resumed}
    if rank == 0:
        torch._dynamo.reset()
        config = bitcompile.TernaryConfig.from_options(opts)
        trained = new_model(7)
        trained.load_state_dict(full)
        tokens = batch(99, 1)[:, :-1]
        with torch.no_grad():
            ternary = torch.compile(copy.deepcopy(trained), backend="bitcpm", options=opts)(tokens)
            packed_model = bitcompile.pack(trained, config)
            packed = packed_model(tokens)
        result["packed_layers"] = sum(1 for m in packed_model.modules() if isinstance(m, bitcompile.PackedTernaryLinear))
        result["packed_vs_ternary_max_abs"] = float((packed - ternary).abs().max())
        result["logit_scale"] = float(ternary.abs().max())
    return result


TP_RUNS = [-1, "tensor", 16]  # scale modes of the tensor-parallel runs (16 divides every row-parallel K shard)


def tp_model(group_size, mesh) -> nn.Module:
    """A tensor-parallel (Megatron plan) TinyLlama, the whole model compiled with bitcpm."""
    from torch.distributed.tensor.parallel import parallelize_module

    from bitcompile.distributed import check_plan, megatron_plan

    model = new_model()
    plan = megatron_plan(model)
    check_plan(plan)
    check_options(options(group_size))
    parallelize_module(model, mesh, plan)
    return model


def scenario_tp(rank: int, world: int) -> dict:
    """2-rank TP vs 1 process on the same batch (every TP rank sees the whole batch)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    runs = []
    for group_size in TP_RUNS:
        torch._dynamo.reset()
        model = tp_model(group_size, mesh)
        rewritten: set[str] = set()
        ops: list[str] = []

        def keep(record, rewritten=rewritten, ops=ops):
            rewritten.update(d.name for d in record.layers if d.rewritten)
            ops.extend(str(n.target) for n in record.graph_module.graph.nodes if n.op == "call_function")

        compiled = torch.compile(model, backend="bitcpm", options=options(group_size))
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        losses, counted = [], {}
        with observe_compilations(keep):
            for step in range(STEPS):
                tokens = batch(step, 1)
                with count_collectives() if step == STEPS - 1 else contextlib.nullcontext({}) as counts:
                    loss = loss_fn(compiled, tokens)
                    loss.backward()
                counted = dict(counts)
                if step == 0:
                    grads = {n.removesuffix(".weight"): float(_local(p.grad).abs().sum()) for n, p in model.named_parameters()}
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
        weights = full_weights(model)  # every rank: full_tensor() is a collective
        runs.append({"group_size": group_size, "losses": losses, "collectives_step": counted,
                     "rewritten": sorted(rewritten), "sharded_ops": ops.count("bitcpm.ternary_linear_sharded.default"),
                     "grads": grads, "weights": {k: v.tolist() for k, v in weights.items()} if rank == 0 else {}})  # fmt: skip
    refs = {i: reference_run(gs, False, STEPS, 1) for i, gs in enumerate(TP_RUNS) if i % world == rank}
    all_refs: list = [None] * world
    dist.all_gather_object(all_refs, refs)
    merged = {i: r for part in all_refs for i, r in part.items()}
    for i, run in enumerate(runs):
        run["reference"] = merged[i] if rank == 0 else {"losses": merged[i]["losses"]}
    torch._dynamo.reset()
    try:  # groups of 12 along K straddle the 16-column shards of the row-parallel o_proj
        torch.compile(tp_model(12, mesh), backend="bitcpm", options=options(12))(batch(0, 1)[:, :-1])
        straddle = None
    except bitcompile.TernaryConfigError as err:
        straddle = f"{type(err).__name__}: {err}"
    return {"runs": runs, "steps": STEPS, "plan_mismatch": scenario_plan_mismatch(rank, world, mesh), "straddle": straddle}


def scenario_two_bit(rank: int, world: int, param_dtypes=("float32",)) -> dict:
    """FSDP2 with precomputed per-tensor scales: float all-gather vs 2-bit all-gather, same data."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from bitcompile.distributed import enable_two_bit_all_gather

    opts = options("tensor")
    runs = []
    for param_dtype in param_dtypes:
        for two_bit in (False, True):
            torch._dynamo.reset()
            model = new_model()
            enable_tensor_scales(model, opts, auto=False)
            gathered = enable_two_bit_all_gather(model) if two_bit else []
            mp = MixedPrecisionPolicy(param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32)
            for layer in model.layers:
                compile_module(layer, opts)
                fully_shard(layer, mp_policy=mp)
            compile_module(model.lm_head, opts)
            fully_shard(model, mp_policy=mp)
            opt = torch.optim.AdamW(model.parameters(), lr=LR)
            losses, counted, counted_bytes = [], {}, {}
            precompute_tensor_scales(model)
            for step in range(STEPS):
                tokens = batch(step, world)[rank * PER_RANK_BATCH : (rank + 1) * PER_RANK_BATCH]
                with count_collectives() if step == STEPS - 1 else contextlib.nullcontext({}) as counts:
                    loss = loss_fn(model, tokens)
                    loss.backward()
                if step == STEPS - 1:
                    counted, counted_bytes = dict(counts), dict(counts.bytes)
                if step == 0:
                    grad_dtypes = sorted({str(_local(p.grad).dtype) for p in model.parameters()})
                    grad_sums = {n: float(_local(p.grad).abs().sum()) for n, p in model.named_parameters()}
                opt.step()
                opt.zero_grad()
                precompute_tensor_scales(model)
                losses.append(loss.item())
            all_losses: list = [None] * world
            dist.all_gather_object(all_losses, losses)
            weights = full_weights(model)
            runs.append({"param_dtype": param_dtype, "two_bit": two_bit, "gathered_2bit": gathered,
                         "mean_losses": [sum(x) / world for x in zip(*all_losses)], "collectives_step": counted,
                         "bytes_step": counted_bytes, "grad_dtypes": grad_dtypes, "grads": grad_sums,
                         "weights": {k: v.tolist() for k, v in weights.items()} if rank == 0 else {}})  # fmt: skip
    return {"runs": runs, "steps": STEPS}


def scenario_fsdp_tp(rank: int, world: int, dp: int) -> dict:
    """2-D: FSDP2 over ``dp`` ranks x TP over ``world // dp`` ranks vs 1 process on the concatenated batch."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    from bitcompile.distributed import check_plan, megatron_plan

    mesh = init_device_mesh("cpu", (dp, world // dp), mesh_dim_names=("dp", "tp"))
    dp_rank = mesh["dp"].get_local_rank()
    opts = options(-1)
    torch._dynamo.reset()
    model = new_model()
    plan = megatron_plan(model)
    check_plan(plan)
    check_options(opts)
    parallelize_module(model, mesh["tp"], plan)
    for layer in model.layers:
        compile_module(layer, opts)
        fully_shard(layer, mesh=mesh["dp"])
    compile_module(model.lm_head, opts)
    fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses, counted, counted_bytes = [], {}, {}
    for step in range(STEPS):
        tokens = batch(step, dp)[dp_rank * PER_RANK_BATCH : (dp_rank + 1) * PER_RANK_BATCH]
        with count_collectives() if step == STEPS - 1 else contextlib.nullcontext({}) as counts:
            loss = loss_fn(model, tokens)
            loss.backward()
        if step == STEPS - 1:
            counted, counted_bytes = dict(counts), dict(counts.bytes)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    gathered: list = [None] * world
    dist.all_gather_object(gathered, (dp_rank, losses))
    per_dp = {r: l for r, l in gathered}
    mean_losses = [sum(x) / dp for x in zip(*(per_dp[r] for r in range(dp)))]
    weights = full_weights(model)
    result = {"dp": dp, "tp": world // dp, "mean_losses": mean_losses, "collectives_step": counted, "bytes_step": counted_bytes}
    if rank == 0:
        ref = reference_run(-1, False, STEPS, dp)
        result["reference"] = ref["losses"]
        result["max_weight_diff"] = max(
            float((torch.tensor(ref["weights"][k]) - weights[k]).abs().max()) for k in ref["weights"]
        )
    return result


def scenario_plan_mismatch(rank: int, world: int, mesh) -> dict:
    """Rank 1 forgets to parallelize down_proj: every rank must raise the same error, at once."""
    from bitcompile.distributed import PlanMismatchError, check_plan, megatron_plan

    plan = megatron_plan(new_model())
    if rank == 1:
        del plan["layers.1.mlp.down_proj"]
    start = time.monotonic()
    try:
        check_plan(plan)
    except PlanMismatchError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def scenario_mismatch(rank: int, world: int) -> dict:
    opts = options(-1 if rank == 0 else 32)
    start = time.monotonic()
    try:
        check_options(opts)
    except OptionsMismatchError as err:
        return {"error": str(err), "seconds": time.monotonic() - start}
    return {"error": None, "seconds": time.monotonic() - start}


def scenario_die(rank: int, world: int, out: Path, stall: bool, tensor_parallel: bool = False) -> dict:
    """Rank 1 dies (``die``, ``die_tp``) or stops answering (``stall``) at step 1; rank 0's step 1 must raise."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    opts = options(-1)
    if tensor_parallel:  # every TP rank sees the whole batch
        from torch.distributed.device_mesh import init_device_mesh

        model = tp_model(-1, init_device_mesh("cpu", (world,)))
    else:
        model = DDP(new_model(), **no_buffer_sync())
    compiled = torch.compile(model, backend="bitcpm", options=opts)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    for step in range(3):
        if step == 1 and rank == 1:
            print(f"rank 1: {'stalling' if stall else 'dying'} now", flush=True)
            if stall:
                time.sleep(600)  # alive but silent: only the process group's timeout can end rank 0's wait
            os._exit(17)
        start = time.monotonic()
        try:
            tokens = batch(step, world)[rank * PER_RANK_BATCH : (rank + 1) * PER_RANK_BATCH]
            loss_fn(compiled, batch(step, 1) if tensor_parallel else tokens).backward()
            opt.step()
            opt.zero_grad()
        except Exception as err:
            result = {"failed_step": step, "seconds": time.monotonic() - start, "error": f"{type(err).__name__}: {err}"[:2000]}
            (out / f"rank{rank}.json").write_text(json.dumps(result))
            raise  # exits non-zero like any training script would, without our help
    return {"failed_step": None}


def main() -> int:
    scenario, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=float(os.environ.get("BITCPM_TEST_PG_TIMEOUT", "60")))
    dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    if scenario == "train":
        result = scenario_train(rank, world)
    elif scenario.startswith("fsdp_tp"):  # fsdp_tp<dp>
        result = scenario_fsdp_tp(rank, world, int(scenario.removeprefix("fsdp_tp") or 2))
    elif scenario == "two_bit":
        result = scenario_two_bit(rank, world)
    elif scenario == "tp":
        result = scenario_tp(rank, world)
    elif scenario == "checkpoint":
        result = scenario_checkpoint(rank, world, out)
    elif scenario in ("die", "stall", "die_tp"):
        result = scenario_die(rank, world, out, stall=scenario == "stall", tensor_parallel=scenario == "die_tp")
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
