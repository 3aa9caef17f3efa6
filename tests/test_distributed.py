"""Distributed ternary training (issue 8): DDP and FSDP2 on gloo, 2 CPU processes.

Each ``launch`` starts two ``tests/distributed_worker.py`` processes the way ``torchrun``
would (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), with a hard wall-clock limit: a
hang fails the test instead of hanging CI. Single-process tests of the helpers follow.

Tolerances (fp32, 3 AdamW steps of the tiny TinyLlama): losses and final latent weights of
2-rank DDP / FSDP2 agree with 1-process training on the concatenated batch to ``TOL``.
Observed on the dev machine: losses within 2.4e-7, weights within 1.2e-6 (the gradient sums
run in another order; ternary codes did not flip).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import bitcompile
from bitcompile.distributed import (
    OptionsMismatchError,
    StaleTensorScalesError,
    TensorScaledLinear,
    check_options,
    compile_module,
    count_collectives,
    enable_tensor_scales,
    precompute_tensor_scales,
    tensor_scale_mode,
)
from bitcompile.models.tiny_llama import TinyLlama, TinyLlamaConfig

WORKER = Path(__file__).with_name("distributed_worker.py")
TOL = 1e-5
PROJECTIONS = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # fmt: skip
LINEARS = {f"layers.{i}.{p}" for i in range(2) for p in PROJECTIONS} | {"lm_head"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(scenario: str, out: Path, pg_timeout: float = 60, world: int = 2) -> list:
    """Start the ``world`` ranks (default both) of ``scenario`` (results and logs go to ``out``)."""
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                   LOCAL_RANK=str(rank), BITCPM_TEST_PG_TIMEOUT=str(pg_timeout), OMP_NUM_THREADS="1")  # fmt: skip
        log = open(out / f"log{rank}.txt", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), scenario, str(out)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    return procs


def finish(procs: list, out: Path, limit: float, wait_for: tuple[int, ...] = (0, 1)):
    """Wait for the ranks in ``wait_for``; kill everything at ``limit`` seconds. (codes, logs, results)."""
    start_time = time.monotonic()
    codes: dict[int, int | None] = {}
    try:
        for rank in wait_for:
            remaining = max(limit - (time.monotonic() - start_time), 0.1)
            codes[rank] = procs[rank][0].wait(timeout=remaining)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    logs = [(out / f"log{rank}.txt").read_text() for rank in range(len(procs))]
    for rank in wait_for:
        assert codes.get(rank) is not None, f"rank {rank} still running after {limit}s (hang):\n{logs[rank][-3000:]}"
    results = [json.loads(p.read_text()) if (p := out / f"rank{r}.json").exists() else None for r in range(len(procs))]
    return codes, logs, results


def launch(scenario: str, out: Path, limit: float, pg_timeout: float = 60):
    return finish(start(scenario, out, pg_timeout), out, limit)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    codes, logs, results = launch("train", tmp_path_factory.mktemp("train"), limit=240)
    assert codes == {0: 0, 1: 0}, "\n".join(log[-3000:] for log in logs)
    return results


def _runs(trained, wrapper):
    return [(i, run) for i, run in enumerate(trained[0]["runs"]) if run["wrapper"] == wrapper]


def _max_weight_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((torch.tensor(a[k]) - torch.tensor(b[k])).abs().max()) for k in a)


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_matches_one_process_on_the_concatenated_batch(trained, wrapper):
    runs = _runs(trained, wrapper)
    assert runs
    for _, run in runs:
        ref = run["reference"]
        label = f"{wrapper} group_size={run['group_size']} precomputed={run['precomputed']}"
        assert len(run["mean_losses"]) == len(ref["losses"]) == trained[0]["steps"]
        assert run["mean_losses"] == pytest.approx(ref["losses"], abs=TOL, rel=0), label
        assert _max_weight_diff(run["weights"], ref["weights"]) <= TOL, label
        # it trained: the weights moved away from the shared initialisation
        assert ref["losses"][0] != ref["losses"][-1]


def test_gradients_reach_every_rewritten_latent_weight_on_every_rank(trained):
    for rank in range(2):
        for run in trained[rank]["runs"]:
            label = f"rank {rank} {run['wrapper']} group_size={run['group_size']} precomputed={run['precomputed']}"
            grads = run["grads"]  # |grad| sums of this rank's (shard of the) weight after step 0
            assert LINEARS <= grads.keys(), label
            assert all(grads[name] > 0 for name in LINEARS), label
            if run["wrapper"] == "ddp":  # one graph for the whole model
                assert set(run["rewritten"]) == LINEARS, label
            else:  # per-block graphs: one layer graph (shared by both layers) + the head
                layer_graph = {n for n in run["rewritten"] if n in PROJECTIONS}
                assert layer_graph == PROJECTIONS and len(run["rewritten"]) == 8, label


def test_collectives_per_step_for_each_scale_mode(trained):
    steps = trained[0]["steps"]
    for rank in range(2):
        for run in trained[rank]["runs"]:
            counts = run["collectives_step"]
            precomputed_fsdp = run["precomputed"] and run["wrapper"] == "fsdp"
            if run["wrapper"] == "ddp":
                # one gradient bucket; replicated weights need no scale collective in any mode
                assert counts == {"allreduce_": 1}, run
            else:
                # FSDP2, 2 blocks + root: forward all-gathers root + 2 layers, backward re-gathers the
                # 2 layers, 3 reduce-scatters; + exactly one all-reduce for ALL per-tensor scales
                expected = {"_allgather_base_": 5, "_reduce_scatter_base_": 3}
                if precomputed_fsdp:
                    expected["allreduce_"] = 1
                assert counts == expected, run
            assert run["scale_collectives_total"] == (steps if precomputed_fsdp else 0), run
            if precomputed_fsdp:
                assert run["scale_vs_global_absmean"] <= 1e-6


# --------------------------------------------------------------------------- checkpoint


def test_checkpoint_resume_is_identical_and_the_gathered_model_packs(tmp_path):
    codes, logs, results = launch("checkpoint", tmp_path, limit=150)
    assert codes == {0: 0, 1: 0}, "\n".join(log[-3000:] for log in logs)
    for rank in range(2):
        r = results[rank]
        assert r["resumed"] == r["uninterrupted"], f"rank {rank}: {r}"  # bit-identical losses
        assert r["first"][0] != r["resumed"][0]
    assert results[0]["packed_layers"] == 15
    assert results[0]["packed_vs_ternary_max_abs"] <= 1e-5 * max(results[0]["logit_scale"], 1.0)


# --------------------------------------------------------------------------- bad input


def test_ranks_with_different_options_fail_fast_on_every_rank(trained):
    # the train scenario starts with rank 0 on group_size=-1 and rank 1 on 32: both must raise at once
    for rank in range(2):
        mismatch = trained[rank]["mismatch"]
        err = mismatch["error"]
        assert err and f"this is rank {rank}" in err and "group_size: rank 0=-1, rank 1=32" in err, mismatch
        assert mismatch["seconds"] < 10


def test_a_dead_or_stalled_rank_makes_the_other_fail_within_the_collective_timeout(tmp_path):
    # Two 2-rank worlds at once (gloo, 8 s collective timeout). "die": rank 1 exits at step 1;
    # "stall": rank 1 stays alive but stops answering at step 1. Rank 0 must exit with an error.
    timeout = 8
    dying = start("die", tmp_path / "die", pg_timeout=timeout)
    stalled = start("stall", tmp_path / "stall", pg_timeout=timeout)
    codes, logs, results = finish(dying, tmp_path / "die", limit=120)
    assert codes[1] == 17 and codes[0] not in (0, None), logs
    assert results[0]["failed_step"] == 1 and results[0]["seconds"] < timeout + 5, results[0]
    assert "RuntimeError" in results[0]["error"] and "Traceback" in logs[0]
    codes, logs, results = finish(stalled, tmp_path / "stall", limit=120, wait_for=(0,))
    assert codes[0] not in (0, None), logs[0][-3000:]
    assert results[0]["failed_step"] == 1, results[0]
    assert timeout - 1 <= results[0]["seconds"] < timeout + 10, results[0]  # the timeout, not a hang
    assert "timed out" in results[0]["error"].lower() or "timeout" in results[0]["error"].lower(), results[0]


# --------------------------------------------------------------------------- one process

OPTS = {"group_size": "tensor", "inner": "aot_eager", "target": "reference", "float_roles": []}  # lm_head too


def _tiny() -> TinyLlama:
    return TinyLlama(TinyLlamaConfig(hidden_size=32, intermediate_size=64, num_layers=1, tie_embeddings=False))


def test_prescaled_op_equals_the_per_tensor_op_and_passes_opcheck():
    torch.manual_seed(1)
    x = torch.randn(3, 5, 40, requires_grad=True)
    w = torch.randn(24, 40, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    scale = w.detach().abs().mean()
    for qa in (True, False):
        ref = torch.ops.bitcpm.ternary_linear(x, w, b, 0, qa, "reference")
        got = torch.ops.bitcpm.ternary_linear_prescaled(x, w, b, scale, qa, "reference")
        for r, g in zip(ref, got):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
        gy = torch.randn_like(ref[0])
        grads_ref = torch.autograd.grad(ref[0], (x, w, b), gy)
        grads_got = torch.autograd.grad(got[0], (x, w, b), gy)
        for r, g in zip(grads_ref, grads_got):
            torch.testing.assert_close(g, r, rtol=0, atol=0)
        torch.library.opcheck(torch.ops.bitcpm.ternary_linear_prescaled.default, (x, w, b, scale, qa, "reference"))
    # a different scale changes the codes: the op really uses the given scale
    other = torch.ops.bitcpm.ternary_linear_prescaled(x, w, b, scale * 3, True, "reference")
    assert not torch.equal(other[3], ref[3])
    torch.library.opcheck(torch.ops.bitcpm.tensor_scale_marker.default, (w, scale))
    with pytest.raises(ValueError, match="one element"):
        torch.ops.bitcpm.ternary_linear_prescaled(x, w, b, torch.ones(2), True, "reference")


def test_precomputed_scales_compile_to_the_prescaled_op_with_identical_training():
    torch.manual_seed(0)
    plain, scaled = _tiny(), _tiny()
    scaled.load_state_dict(plain.state_dict())
    names = enable_tensor_scales(scaled, OPTS)
    assert len(names) == 8 and all(isinstance(scaled.get_submodule(n), TensorScaledLinear) for n in names)
    assert "weight_scale" not in " ".join(scaled.state_dict())  # checkpoints unchanged
    report = bitcompile.explain(scaled, torch.randint(0, 64, (2, 8)), **OPTS)
    assert report.scale_mode.startswith("per-tensor, precomputed") and report.to_json()["scale_mode"] == report.scale_mode
    ops = [n.target for g in report.graphs for n in g.nodes if n.role == "ternary"]
    assert ops == ["bitcpm.ternary_linear_prescaled"] * 8
    assert bitcompile.explain(plain, torch.randint(0, 64, (2, 8)), **OPTS).scale_mode.startswith("per-tensor, in forward")
    assert "per-row" in bitcompile.explain(plain, torch.randint(0, 64, (2, 8)), inner="eager").scale_mode
    losses = {}
    for key, model in (("plain", plain), ("scaled", scaled)):
        compiled = torch.compile(model, backend="bitcpm", options=OPTS)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        losses[key] = []
        for step in range(3):
            tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(step))
            loss = torch.nn.functional.cross_entropy(compiled(tokens[:, :-1]).reshape(-1, 64), tokens[:, 1:].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[key].append(loss.item())
    assert losses["scaled"] == pytest.approx(losses["plain"], abs=1e-6)
    precompute_tensor_scales(scaled)  # the buffers held the scales of the last forward; refresh after the step
    q = scaled.layers[0].self_attn.q_proj
    assert float(q.weight_scale) == pytest.approx(float(q.weight.detach().abs().mean()), rel=1e-6)


def test_manual_mode_refuses_stale_scales():
    model = _tiny()
    enable_tensor_scales(model, OPTS, auto=False)
    tokens = torch.randint(0, 64, (1, 4))
    with pytest.raises(StaleTensorScalesError, match="never computed"):
        model(tokens)
    assert precompute_tensor_scales(model) == 0  # nothing sharded: no collective
    model(tokens).sum().backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    with pytest.raises(StaleTensorScalesError, match="optimizer.step"):
        model(tokens)
    precompute_tensor_scales(model)
    model(tokens)


def test_enable_tensor_scales_rejects_other_modes_and_skips_excluded_layers():
    with pytest.raises(ValueError, match="group_size='tensor'"):
        enable_tensor_scales(_tiny(), {"group_size": -1})
    model = _tiny()
    names = enable_tensor_scales(model, {"group_size": "tensor", "exclude": ["lm_head", "*.down_proj"]})
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names) and len(names) == 6
    with pytest.raises(RuntimeError, match="already"):
        enable_tensor_scales(model, OPTS)
    assert tensor_scale_mode(model, OPTS) == "per-tensor (precomputed)"
    assert tensor_scale_mode(None, {"group_size": 64}) == "per-group"


def test_check_options_without_a_process_group_parses_and_validates():
    assert check_options({"group_size": 32}).group_size == bitcompile.ScaleGroups.of(32)
    with pytest.raises(bitcompile.TernaryConfigError):
        check_options({"group_size": 0})
    assert issubclass(OptionsMismatchError, bitcompile.TernaryConfigError)


def test_compile_module_rewrites_a_bare_linear_head():
    from bitcompile.backend import observe_compilations

    head = nn.Linear(32, 16)
    records = []
    with observe_compilations(records.append):
        compile_module(head, {"inner": "eager", "target": "reference"})(torch.randn(2, 32))
    assert [d.rewritten for r in records for d in r.layers] == [True]
    assert list(head.state_dict()) == ["weight", "bias"]


def test_count_collectives_sees_nothing_without_communication():
    with count_collectives() as counts:
        torch.ones(3).sum()
    assert counts.total == 0
