"""target="cann": planning, post-AOT lowering to torch.ops.npu.*, end to end through the emulator.

Tolerances against ``target="reference"``: ``|y - y_reference| <= 1e-2 * max|y_reference| +
1e-2 * |y_reference|`` for fp32 *and* bf16 models. fp32 models run each ternary layer in bf16
(8 significant bits, 2**-8 = 0.4 %); and ``npu_dynamic_quant`` computes ``x * (127/max)``
where the reference divides by ``max/127``, so an activation code flips by one in ~0.04 % of
elements (13 % of rows) and the flip propagates through the network. Measured on the tiny
Llama over three seeds: max |Δ| / max|y| = 0.13-0.58 % (bf16), 0.21-0.33 % (fp32). One
layer on the hardware codes is still exact: see test_a8_layer_is_exact_on_the_hardware_codes.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import reference_impl as ref
from bitcompile.backend import observe_compilations
from bitcompile.inspect.report import explain
from bitcompile.models import TinyLlama, TinyLlamaConfig
from bitcompile.runtime.ops import ternary_linear_output
from bitcompile.targets import get_kernel, resolve_target

NPU_A8 = ("npu.npu_dynamic_quant.default", "npu.npu_quant_matmul.default")


def _compile(model, **options):
    options.setdefault("inner", "aot_eager")
    return torch.compile(model, backend="bitcpm", options=options)


def _run(model, inputs, grad=False, **options):
    records = []
    torch._dynamo.reset()
    with observe_compilations(records.append), torch.set_grad_enabled(grad):
        out = _compile(model, **options)(*inputs)
    return out, records


def _close(actual, expected, rel=1e-2):
    torch.testing.assert_close(actual.float(), expected.float(), rtol=rel, atol=rel * expected.abs().max().item())


def _npu_calls(code: str) -> list[str]:
    return [line.split("torch.ops.")[1].split("(")[0] for line in code.splitlines() if "torch.ops.npu." in line]


def _tiny(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return TinyLlama(TinyLlamaConfig()).to(dtype), torch.randint(0, 64, (2, 12))


def test_resolve_target():
    assert resolve_target("cann") == "cann"
    assert resolve_target("auto", [torch.zeros(1)]) in ("reference", "cpu")  # cann only for npu inputs
    assert get_kernel("cann").PROVIDER == "emulator"


def test_tiny_llama_inference_fp32_within_tolerance_and_graph_shows_npu_ops():
    model, tokens = _tiny()
    expected, _ = _run(model, (tokens,), target="reference")
    out, records = _run(model, (tokens,), target="cann")
    _close(out, expected)
    assert not torch.equal(out, expected)  # it really went through bf16 kernels
    (record,) = records
    calls = _npu_calls(record.after)
    assert calls.count("npu.npu_quant_matmul.default") == 14  # 2 layers x q,k,v,o,gate,up,down
    assert calls[:2] == list(NPU_A8)
    assert calls == list(NPU_A8) * 14
    rewritten = [d for d in record.layers if d.rewritten]
    assert len(rewritten) == 14 and all("npu_dynamic_quant -> npu_quant_matmul" in d.reason for d in rewritten)


def test_tiny_llama_inference_bf16_within_tolerance():
    model, tokens = _tiny(torch.bfloat16)
    expected, _ = _run(model, (tokens,), target="reference")
    out, _ = _run(model, (tokens,), target="cann")
    assert out.dtype == torch.bfloat16
    _close(out, expected)


def test_a8_layer_is_exact_on_the_hardware_codes():
    """bf16 per-row A8: the only difference from the reference is npu_dynamic_quant's codes and scales.

    Fed those codes and scales, the reference ternary matmul gives the cann output bit for bit
    (exact int32 accumulation, fp32 dequantization in the same order); rows whose codes match
    the reference quantizer's are equal to the reference target's output.
    """
    torch.manual_seed(3)
    layer = nn.Linear(512, 64).bfloat16()
    x = torch.randn(400, 512).bfloat16()
    out, _ = _run(layer, (x,), target="cann")
    q, s = torch.ops.npu.npu_dynamic_quant(x)
    w_codes, w_scales = ref.ternary_codes(layer.weight.float(), -1)
    acc = (q.double() @ w_codes.double().t()).float()
    on_hw_codes = (acc * w_scales[:, 0] * s[:, None] + layer.bias.float()).bfloat16()
    assert torch.equal(out, on_hw_codes)
    expected, _ = _run(layer, (x,), target="reference")
    ref_codes, ref_scales = ref.activation_codes(x)
    same_rows = (q.long() == ref_codes).all(1) & (s == ref_scales.float())
    assert 0 < same_rows.sum() < len(same_rows)  # some rows flip a code or a scale ulp, most do not
    assert torch.equal(out[same_rows], expected[same_rows])
    _close(out, expected)


def test_lowered_graph_equals_eager_cann_op():
    """The post-AOT npu.* sequence computes exactly what bitcpm::ternary_linear(kernel='cann') does."""
    layer = nn.Linear(96, 40).bfloat16()
    x = torch.randn(3, 5, 96, dtype=torch.bfloat16)
    for options in ({}, {"group_size": 32}, {"activations": None}):
        out, _ = _run(layer, (x,), target="cann", **options)
        from bitcompile.config import TernaryConfig

        cfg = TernaryConfig(**options)
        eager = ternary_linear_output(x, layer.weight, layer.bias, cfg.group_code, cfg.quantize_activations, "cann")
        assert torch.equal(out, eager), options


def test_per_group_and_weight_only_use_weight_quant_batchmatmul():
    torch.manual_seed(1)
    layer = nn.Linear(80, 24)  # K=80: groups of 32 end with a short group of 16
    x = torch.randn(2, 7, 80)
    cases = [
        ({"group_size": 32}, "int8", ["npu.npu_dynamic_quant.default", "npu.npu_weight_quant_batchmatmul.default"]),
        ({"group_size": 32, "activations": None}, None, ["npu.npu_weight_quant_batchmatmul.default"]),
        ({"activations": None}, None, ["npu.npu_weight_quant_batchmatmul.default"]),
    ]
    for options, acts, expected_calls in cases:
        out, (record,) = _run(layer, (x,), target="cann", **options)
        assert _npu_calls(record.after) == expected_calls, options
        group = options.get("group_size", -1)
        expected = ref.ternary_linear_forward(x, layer.weight, layer.bias, group, acts).float()
        _close(out, expected, rel=2e-2)
        assert "npu_weight_quant_batchmatmul" in record.layers[0].reason


def test_constraint_violations_fall_back_with_reason():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.wide = nn.Linear(8, 65536 + 8, bias=False)  # N over the 65535 limit
            self.small = nn.Linear(8, 16)

        def forward(self, x):
            return self.wide(x)[..., :8] + self.small(x)[..., :8]

    model = Two()
    x = torch.randn(3, 8)
    # W1.58A8 per-row: the A2/A3 quant_batch_matmul_v3 tiling exempts int8 + 1-D fp32 scale + 1-D
    # pertoken_scale from the 65535 limit, so a vocabulary-sized layer stays on the NPU
    expected, _ = _run(model, (x,), target="reference")
    out, (record,) = _run(model, (x,), target="cann")
    wide, small = record.layers
    assert "npu_quant_matmul" in wide.reason and "npu_quant_matmul" in small.reason
    assert _npu_calls(record.after) == list(NPU_A8) * 2
    _close(out, expected)
    # npu_weight_quant_batchmatmul keeps K, N <= 65535: weight-only, the wide layer stays on the float path
    expected, _ = _run(model, (x,), target="reference", activations=None)
    out, (record,) = _run(model, (x,), target="cann", activations=None)
    wide, small = record.layers
    assert wide.rewritten and "kept on the float path" in wide.reason and "65535" in wide.reason
    assert "npu_weight_quant_batchmatmul" in small.reason
    assert _npu_calls(record.after) == ["npu.npu_weight_quant_batchmatmul.default"]  # only the small layer
    _close(out, expected)

    layer = nn.Linear(96, 16)
    _, (record,) = _run(layer, (torch.randn(2, 96),), target="cann", group_size=48)
    assert "group size 48 is not a multiple of 32" in record.layers[0].reason
    assert _npu_calls(record.after) == []
    assert "'reference'" in record.after  # the layer stayed on bitcpm::ternary_linear(..., 'reference')


def test_training_steps_track_reference_and_backward_is_the_fused_op():
    losses = {}
    graphs = {}
    for target in ("reference", "cann"):
        model, tokens = _tiny(seed=3)
        compiled = _compile(model, target=target)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        torch._dynamo.reset()
        records = []
        with observe_compilations(records.append):
            steps = []
            for _ in range(3):
                logits = compiled(tokens[:, :-1])
                loss = nn.functional.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
                opt.zero_grad()
                loss.backward()
                assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
                opt.step()
                steps.append(loss.item())
        losses[target], graphs[target] = steps, records
    assert losses["cann"][-1] < losses["cann"][0]
    for a, b in zip(losses["cann"], losses["reference"]):
        assert abs(a - b) <= 1e-2 * abs(b)
    calls = _npu_calls(graphs["cann"][0].after)
    assert calls == list(NPU_A8) * 14


def test_explain_report_shows_npu_sequence():
    model, tokens = _tiny()
    report = explain(model, tokens, target="cann")
    assert report.kernel == "cann"
    text = str(report)
    assert "npu_quant_matmul" in text
    assert _npu_calls(report.graphs[0].after).count("npu.npu_quant_matmul.default") == 14


def test_prepared_weights_match_the_training_path():
    """Weights prepared once (int8 (K, N) copy, int4 pack) compute what the in-graph path computes."""
    cann = get_kernel("cann")
    torch.manual_seed(4)
    for n, k, group, acts, dtype, layout in [
        (40, 96, -1, True, torch.bfloat16, "int8 (K, N)"),
        (24, 80, 0, True, torch.float32, "int8 (K, N)"),
        (48, 128, 32, True, torch.bfloat16, "int4-packed int32 (K, N/8)"),
        (48, 128, 64, False, torch.float16, "int4-packed int32 (K, N/8)"),
        (20, 64, -1, False, torch.bfloat16, "int4-packed int32 (N, K/8).t()"),  # per-channel: transposed
        (20, 60, -1, False, torch.bfloat16, "int8 (K, N)"),  # K and N not multiples of 8
    ]:
        w, b = torch.randn(n, k).to(dtype), torch.randn(n).to(dtype)
        x = torch.randn(3, 4, k).to(dtype)
        codes, scales = cann.quantize_weight(w, group)
        prepared = cann.prepare_weight(codes, scales, group, acts, dtype)
        assert f"{layout} ND" in prepared["layout"], (prepared["layout"], layout)
        weight = prepared["weight"]
        assert weight.dtype == (torch.int32 if "int4" in layout else torch.int8)
        assert (weight.t() if ".t()" in layout else weight).is_contiguous()
        got = cann.prepared_linear(x, prepared, b, acts, n)
        want = ternary_linear_output(x, w, b, group, acts, "cann")
        assert torch.equal(got, want), (n, k, group, acts, dtype)


def test_benchmark_smoke_runs_through_the_emulator(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_cann.py"
    spec = importlib.util.spec_from_file_location("bench_cann", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "within tolerance" in out and "mean nothing" in out


def test_packed_model_on_target_cann_matches_packed_reference():
    """PackedTernaryLinear with target="cann" runs the cann kernels (bf16 A8: within the cann tolerance)."""
    from bitcompile.config import TernaryConfig
    from bitcompile.runtime.modules import pack

    outs = {}
    for target in ("reference", "cann"):
        model, tokens = _tiny(torch.bfloat16, seed=5)
        packed = pack(model.eval(), TernaryConfig(target=target))
        with torch.no_grad():
            eager = packed(tokens)
        compiled, _ = _run(packed, (tokens,), target=target)
        assert torch.equal(eager, compiled)
        outs[target] = eager
    _close(outs["cann"], outs["reference"])


# ---- packed inference on target cann: weights prepared once at compile time ----


class _Counter:
    """Counts calls of a real function and calls it (a spy, not a replacement)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)


def _spies(monkeypatch):
    import bitcompile.kernels.packing as packing

    cann = get_kernel("cann")
    unpack, prepare = _Counter(packing.unpack_codes), _Counter(cann.prepare_weight)
    monkeypatch.setattr(packing, "unpack_codes", unpack)  # every kernel imports it from here at call time
    monkeypatch.setattr(cann, "prepare_weight", prepare)
    return unpack, prepare


def _packed_tiny(dtype, target, seed=5, **config):
    from bitcompile.config import TernaryConfig
    from bitcompile.runtime.modules import pack

    model, tokens = _tiny(dtype, seed=seed)
    return pack(model.eval(), TernaryConfig(target=target, **config)), tokens


def test_packed_tiny_llama_runs_on_weights_prepared_once(monkeypatch):
    """fp32 packed TinyLlama on cann: npu ops on prepared constants, no per-call unpack, one prepare per layer."""
    from bitcompile.passes.freeze_pack import FrozenWeightsChanged

    reference, tokens = _packed_tiny(torch.float32, "reference")
    with torch.no_grad():
        expected = reference(tokens)
    model, _ = _packed_tiny(torch.float32, "cann")
    unpack, prepare = _spies(monkeypatch)
    torch._dynamo.reset()
    records = []
    with observe_compilations(records.append), torch.no_grad():
        compiled = _compile(model, target="cann")
        out = compiled(tokens)
        assert (unpack.calls, prepare.calls) == (14, 14)  # once per layer, at compile time
        for _ in range(3):
            again = compiled(tokens)
    assert (unpack.calls, prepare.calls) == (14, 14)  # nothing per call
    assert torch.equal(out, again)
    _close(out, expected)
    assert not torch.equal(out, expected)  # it really ran the bf16 Ascend kernels
    (record,) = records
    assert _npu_calls(record.after) == list(NPU_A8) * 14
    assert "ternary_linear_packed" not in record.after and "unpack" not in record.after
    assert record.after.count("cann_prepared_linear(") == 14
    buffers = dict(record.graph_module.named_buffers())
    weights = [t for name, t in buffers.items() if name.startswith("_bitcpm_cann_weight")]
    assert len(weights) == 14 and all(w.dtype == torch.int8 and w.is_contiguous() for w in weights)
    q = model.layers[0].self_attn.q_proj
    assert weights[0].shape == (q.in_features, q.out_features)  # (K, N)
    assert torch.equal(weights[0], q.codes().t())
    packed = [d for d in record.layers if d.kind == "packed"]
    assert len(packed) == 14
    assert all(
        "npu_quant_matmul, int8 (K, N) ND = " in d.reason and "prepared once at compile time" in d.reason
        for d in packed
    )

    # The folded buffers are watched: changing one after compilation raises, never serves stale weights.
    with torch.no_grad():
        model.layers[1].mlp.down_proj.packed[0, 0] ^= 1
        with pytest.raises(FrozenWeightsChanged, match=r"layers\.1\.mlp\.down_proj.*prepared for Ascend"):
            compiled(tokens)
        model.layers[1].mlp.down_proj.packed[0, 0] ^= 1  # the same bytes, but a new version: still refused
        with pytest.raises(FrozenWeightsChanged):
            compiled(tokens)
        model.layers[0].self_attn.q_proj.scales = model.layers[0].self_attn.q_proj.scales * 2  # a new tensor
        torch._dynamo.reset()
        recompiled = _compile(model, target="cann")(tokens)
        assert not torch.equal(recompiled, out)  # a recompile picks the new weights up


def test_packed_per_group_and_weight_only_prepare_int4_weights(monkeypatch):
    """Per-group / weight-only packed layers: npu_weight_quant_batchmatmul on int4-packed (or int8) constants."""
    # group_size=32: int4 (K, N/8) where N % 8 == 0 (q,k,v,o: N = 64; down: K = 172), int8 (K, N) for
    # gate/up (N = 172). Per-channel: int4 (N, K/8).t() where K % 8 == 0, else (K, N/8) (down).
    cases = [
        (
            {"group_size": 32}, ["npu.npu_dynamic_quant.default", "npu.npu_weight_quant_batchmatmul.default"],
            {(torch.int32, (64, 8)), (torch.int32, (172, 8)), (torch.int8, (64, 172))},
        ),
        (
            {"activations": None}, ["npu.npu_weight_quant_batchmatmul.default"],
            {(torch.int32, (8, 64)), (torch.int32, (8, 172)), (torch.int32, (172, 8))},
        ),
    ]  # fmt: skip
    for config, sequence, layouts in cases:
        reference, tokens = _packed_tiny(torch.bfloat16, "reference", **config)
        with torch.no_grad():
            expected = reference(tokens)
        model, _ = _packed_tiny(torch.bfloat16, "cann", **config)
        unpack, prepare = _spies(monkeypatch)
        out, (record,) = _run(model, (tokens,), target="cann", **config)
        assert (unpack.calls, prepare.calls) == (14, 14), config
        _close(out, expected, rel=2e-2)
        assert _npu_calls(record.after) == sequence * 14, config
        weights = {n: t for n, t in record.graph_module.named_buffers() if n.startswith("_bitcpm_cann_weight")}
        assert {(t.dtype, tuple(t.shape)) for t in weights.values()} == layouts, config
        packed = [d for d in record.layers if d.kind == "packed"]
        assert len(packed) == 14
        assert all("npu_weight_quant_batchmatmul" in d.reason and "prepared once" in d.reason for d in packed)


def test_packed_layer_violating_a_constraint_stays_on_the_packed_op():
    from bitcompile.config import TernaryConfig
    from bitcompile.runtime.modules import pack

    model = pack(nn.Sequential(nn.Linear(96, 16), nn.Linear(16, 8)).eval(), TernaryConfig(group_size=48, target="cann"))
    x = torch.randn(2, 96)
    with torch.no_grad():
        expected = get_kernel("reference").packed_linear(
            x, model[0].packed, model[0].scales, 96, 48, model[0].bias, True, x.dtype
        )
    out, (record,) = _run(model[:1], (x,), target="cann")
    (decision,) = record.layers
    assert "kept on the float path" in decision.reason and "group size 48 is not a multiple of 32" in decision.reason
    assert _npu_calls(record.after) == [] and "ternary_linear_packed" in record.after and "'reference'" in record.after
    assert torch.equal(out, expected)


def test_prepared_weights_are_shared_across_graphs_and_dynamic_shapes(monkeypatch):
    """A second graph of the same packed model (another sequence length, then dynamic) reuses the prepared tensors."""
    reference, tokens = _packed_tiny(torch.bfloat16, "reference")
    lengths = (12, 7, 5)  # the second shape recompiles with a dynamic sequence length
    with torch.no_grad():
        expected = [reference(tokens[:, :length]) for length in lengths]
    model, _ = _packed_tiny(torch.bfloat16, "cann")
    unpack, prepare = _spies(monkeypatch)
    torch._dynamo.reset()
    records = []
    with observe_compilations(records.append), torch.no_grad():
        compiled = _compile(model, target="cann")
        for length, want in zip(lengths, expected):
            _close(compiled(tokens[:, :length]), want)
    assert len(records) == 2
    assert unpack.calls == prepare.calls == 14
    first, second = ({n: t for n, t in r.graph_module.named_buffers() if "_bitcpm_cann_" in n} for r in records)
    assert all(first[name] is second[name] for name in first)


def test_freeze_on_target_cann_uses_prepared_weights(monkeypatch):
    """freeze=True + cann: quantize once, prepare once, no packed constants left, stale float weights refused."""
    from bitcompile.passes.freeze_pack import FrozenWeightsChanged

    model, tokens = _tiny(seed=6)
    model.eval()
    with torch.no_grad():
        expected, _ = _run(model, (tokens,), target="reference", freeze=True)
        unpack, prepare = _spies(monkeypatch)
        torch._dynamo.reset()
        records = []
        with observe_compilations(records.append):
            compiled = _compile(model, target="cann", freeze=True)
            out = compiled(tokens)
            compiled(tokens)
    assert (unpack.calls, prepare.calls) == (14, 14)
    _close(out, expected)
    (record,) = records
    assert _npu_calls(record.after) == list(NPU_A8) * 14 and "ternary_linear_packed" not in record.after
    names = [n for n, _ in record.graph_module.named_buffers()]
    assert not any(n.startswith("_bitcpm_frozen_") for n in names)
    assert sum(n.startswith("_bitcpm_cann_weight") for n in names) == 14
    assert all("prepared once" in d.reason for d in record.layers if d.rewritten)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight.mul_(2)
        with pytest.raises(FrozenWeightsChanged, match=r"layers\.0\.mlp\.up_proj.*freeze"):
            compiled(tokens)


# ---- the chip and the weight layout are explicit inputs of the plan (issue 21) ----


def test_chip_option_and_device_names():
    from bitcompile.config import TernaryConfig, TernaryConfigError
    from bitcompile.kernels.cann_plan import chip_from_device_name, resolve_chip

    assert TernaryConfig(chip="310P").chip == "310P" and resolve_chip("auto") == "A2"  # the emulator: A2
    with pytest.raises(TernaryConfigError, match="chip"):
        TernaryConfig(chip="910")
    assert [chip_from_device_name(n) for n in ("Ascend910B3", "Ascend910_9392", "Ascend310P3")] == ["A2", "A3", "310P"]
    with pytest.raises(ValueError, match="Ascend910PremiumA"):
        chip_from_device_name("Ascend910PremiumA")


def test_310p_plan_runs_weight_quant_on_int8_in_fp16():
    """310P: no npu_dynamic_quant / int4 / per-token quant_matmul; bf16 is not an activation dtype."""
    from bitcompile.kernels import npu_emulator as emu

    model, tokens = _tiny()
    expected, _ = _run(model, (tokens,), target="reference")
    with emu.emulate(chip="310P"):  # the emulator refuses what 310P lacks: the plan must avoid it
        out, (record,) = _run(model, (tokens,), target="cann", chip="310P")
    assert _npu_calls(record.after) == ["npu.npu_weight_quant_batchmatmul.default"] * 14
    assert "aten int8 quantization (dequantized) -> npu_weight_quant_batchmatmul, int8 (K, N) ND" in next(d for d in record.layers if d.rewritten).reason
    _close(out, expected)
    packed, tokens = _packed_tiny(torch.bfloat16, "cann", activations=None)
    with emu.emulate(chip="310P"), torch.no_grad():
        out, (record,) = _run(packed, (tokens,), target="cann", chip="310P", activations=None)
    weights = [t for n, t in record.graph_module.named_buffers() if n.startswith("_bitcpm_cann_weight")]
    assert len(weights) == 14 and all(w.dtype == torch.int8 for w in weights)
    assert all("Ascend 310P" in d.reason for d in record.layers if d.rewritten)
    # on an A2 emulator the same model prepares int4 weights
    _, (record,) = _run(packed, (tokens,), target="cann", activations=None)
    assert all(t.dtype == torch.int32 for n, t in record.graph_module.named_buffers() if "_cann_weight" in n)


@pytest.mark.parametrize(
    "k,n,group,graph_mode,layout,note",
    [
        (256, 128, 64, True, "int4-packed int32 (K, N/8) FRACTAL_NZ", None),
        (256, 128, 32, True, "int4-packed int32 (K, N/8) ND", "g in {64, 128}"),  # g = 32: ND
        (256, 96, 128, True, "int4-packed int32 (K, N/8) ND", "N % 64 == 0"),
        (256, 128, 64, False, "int4-packed int32 (K, N/8) ND", "need graph mode"),  # eager: no NZ weight
        (256, 128, -1, True, "int4-packed int32 (N, K/8).t() FRACTAL_NZ", None),  # per-channel int4: transposed
        (256, 128, 0, True, "int4-packed int32 (N, K/8).t() ND", "per-channel scales"),  # per-tensor: ND
        (256, 1, -1, True, "int8 (K, N) ND", None),  # N = 1: no NZ, no transposed int4
    ],
)
def test_weight_quant_layout_follows_the_nz_limits(k, n, group, graph_mode, layout, note):
    """Prepared as on an NPU (nz=True): FRACTAL_NZ only where the kernel takes it; the emulator checks each weight."""
    cann = get_kernel("cann")
    torch.manual_seed(k + n)
    w = torch.randn(n, k)
    codes, scales = cann.quantize_weight(w, group)
    prepared = cann.prepare_weight(codes, scales, group, False, torch.bfloat16, "A2", nz=True, graph_mode=graph_mode)
    assert layout in prepared["layout"] and (note is None or note in prepared["layout"]), prepared["layout"]
    from bitcompile.kernels import npu_emulator as emu

    expected_nz = "FRACTAL_NZ" in layout
    assert (emu.get_npu_format(prepared["weight"]) == emu.ACL_FORMAT_FRACTAL_NZ) == expected_nz
    if expected_nz and prepared["weight"].dtype == torch.int32:
        assert emu.storage_format(prepared["weight"])[1] == 8  # C0 = 8: cast before packing
    x = torch.randn(4, k).bfloat16()
    y = cann.prepared_linear(x, prepared, None, False, n)  # the emulator's NZ checks pass
    want = ref.ternary_linear_forward(x.float(), w, None, group if group else "tensor", None)
    _close(y, want, rel=2e-2)


def test_a8_weight_is_nz_on_an_npu_unless_k_or_n_is_1():
    cann = get_kernel("cann")
    from bitcompile.kernels import npu_emulator as emu

    for n, nz in ((64, True), (1, False)):
        codes, scales = cann.quantize_weight(torch.randn(n, 96), -1)
        prepared = cann.prepare_weight(codes, scales, -1, True, torch.bfloat16, "A2", nz=True)
        assert (emu.get_npu_format(prepared["weight"]) == emu.ACL_FORMAT_FRACTAL_NZ) is nz
        y = cann.prepared_linear(torch.randn(3, 96).bfloat16(), prepared, None, True, n)
        assert y.shape == (3, n)


def test_prepared_ascend_weights_follow_writes_the_version_counter_misses():
    """Regression (issue 15, item 5): the cache of prepared weights checked identity and version
    only, so a recompile after ``packed.data.copy_(...)`` folded the old weights again."""
    from bitcompile.kernels import cann
    from bitcompile.kernels.packing import pack_codes

    g = torch.Generator().manual_seed(0)
    packed = pack_codes(torch.randint(-1, 2, (16, 64), generator=g, dtype=torch.int8))
    scales = torch.rand(16, 1, generator=g) + 0.5
    first = cann.prepare_packed(packed, scales, 64, -1, True, torch.float32)
    assert cann.prepare_packed(packed, scales, 64, -1, True, torch.float32)["weight"] is first["weight"]  # cached
    new_codes = torch.randint(-1, 2, (16, 64), generator=g, dtype=torch.int8)
    packed.data.copy_(pack_codes(new_codes))
    again = cann.prepare_packed(packed, scales, 64, -1, True, torch.float32)
    assert torch.equal(again["weight"], new_codes.t())  # int8 (K, N), prepared from the new codes
    scale_before = again["scale"].clone()
    scales.data.mul_(2)
    assert torch.equal(cann.prepare_packed(packed, scales, 64, -1, True, torch.float32)["scale"], scale_before * 2)
