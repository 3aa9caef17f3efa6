"""The support matrix: what bitcompile does on each transformers architecture (writes docs/support.md).

    python benchmarks/support_matrix.py                  # every architecture, writes docs/support.md (~5 min)
    python benchmarks/support_matrix.py --arch Llama BERT --out /tmp/support.md
    python benchmarks/support_matrix.py --arch Llama T5 --json a.json ...; ... --merge a.json b.json

Each architecture is built from a tiny random config (no download) and goes through:

* **compile + train**: ``torch.compile(backend="bitcpm", inner="aot_eager")``, one AdamW step
  on the model's loss (or the mean square of its first output); ✅ when the loss is finite,
  some layer is ternary and the weights moved.
* **explain**: ``bitcompile.explain`` on the same inputs: ternary / float counts.
* **MoE experts**: for an MoE model, how many of its 3-D expert weights ``explain`` lists
  (read from the report, so the cell turns ✅ once expert discovery exists).
* **pack + save/load**: ``pack(example_inputs=)``, ``save_packed`` / ``load_packed`` into a
  fresh model; ✅ when every reloaded tensor is bit-identical (the cell also says whether the
  outputs are: pack serves float layers with bitcompile's fp32 GEMV at <= 8 tokens, load_packed
  with ``F.linear``, which rounds differently).
* **ONNX + ORT**: ``export_onnx`` of the float model (main input → first output), run in
  onnxruntime, compared with the packed PyTorch model; ✅ when the largest difference is under
  1 % of the largest output. Encoder-decoder models: the full model, then ``get_encoder()``.
* **generation**: ``generate`` (greedy, KV cache) of the packed model equals a greedy loop
  without cache over the same packed model (decoder-only and encoder-decoder models).

A ❌ cell carries the first line of the exception (or BitcompileWarning) that caused it; nothing
in a cell is written by hand. ``tests/test_support_matrix.py`` runs a few architectures in CI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import bitcompile
from bitcompile.config import BitcompileWarning

VOCAB, HIDDEN, SEQ = 128, 32, 8
PARITY_TOLERANCE = 0.01  # of the largest |output|: ORT quantizes activations per block, not per token

OK, FAIL, NA = "✅", "❌", "–"


@dataclasses.dataclass
class Arch:
    """One architecture of the sweep: how to build it and what it takes."""

    name: str
    build: Callable[[], torch.nn.Module]
    kind: str  # "causal", "encoder", "vision", "audio", "seq2seq"
    moe: bool = False


def _llama_like(cls_name: str, config_name: str, **extra: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import transformers

        config = getattr(transformers, config_name)(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **extra,
        )  # fmt: skip
        return getattr(transformers, cls_name)(config)

    return build


def _gpt_neox() -> torch.nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    ))  # fmt: skip


def _gpt2() -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=64))


def _bert() -> torch.nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64,
    ))  # fmt: skip


def _t5() -> torch.nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))  # fmt: skip


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(
        image_size=16, patch_size=4, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, num_labels=3,
    ))  # fmt: skip


def _whisper() -> torch.nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        begin_suppress_tokens=None, suppress_tokens=None,
    ))  # fmt: skip


ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        Arch("Llama", _llama_like("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=False), "causal"),
        Arch("Qwen2", _llama_like("Qwen2ForCausalLM", "Qwen2Config", tie_word_embeddings=False), "causal"),
        Arch("Qwen3", _llama_like("Qwen3ForCausalLM", "Qwen3Config", head_dim=8, tie_word_embeddings=False), "causal"),
        Arch("Qwen3-MoE", _llama_like(
            "Qwen3MoeForCausalLM", "Qwen3MoeConfig", head_dim=8, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=32, decoder_sparse_step=1, tie_word_embeddings=False,
        ), "causal", moe=True),  # fmt: skip
        Arch("Mixtral", _llama_like(
            "MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
        ), "causal", moe=True),  # fmt: skip
        Arch("Gemma2", _llama_like("Gemma2ForCausalLM", "Gemma2Config", head_dim=8), "causal"),
        Arch("Phi3", _llama_like("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, tie_word_embeddings=False), "causal"),
        Arch("GPT-NeoX", _gpt_neox, "causal"),
        Arch("GPT-2", _gpt2, "causal"),
        Arch("BERT", _bert, "encoder"),
        Arch("T5", _t5, "seq2seq"),
        Arch("ViT", _vit, "vision"),
        Arch("Whisper", _whisper, "seq2seq"),
    )
}

COLUMNS = ("compile + train", "explain", "MoE experts", "pack + save/load", "ONNX + ORT", "ONNX encoder", "generation")


def _main_input(arch: Arch, model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        size = model.config.image_size
        return torch.randn(batch, model.config.num_channels, size, size, generator=gen)
    if name == "input_features":
        return torch.randn(batch, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=gen)
    return torch.randint(3, VOCAB, (batch, SEQ), generator=gen)


def _positional(arch: Arch, model: torch.nn.Module, x: torch.Tensor) -> tuple[Any, ...]:
    """The model's positional inputs: the main input, plus decoder ids for an encoder-decoder model."""
    if arch.kind != "seq2seq":
        return (x,)
    params = list(inspect.signature(model.forward).parameters)
    args: list[Any] = [None] * (params.index("decoder_input_ids") + 1)
    args[0] = x
    args[-1] = torch.randint(3, VOCAB, (x.shape[0], 4), generator=torch.Generator().manual_seed(2))
    return tuple(args)


def _first_output(out: Any) -> torch.Tensor:
    if hasattr(out, "to_tuple"):
        return out.to_tuple()[0]
    return out[0] if isinstance(out, (tuple, list)) else out


def _why(error: BaseException) -> str:
    """The first line of an exception, without ANSI codes, short enough for a table cell."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).replace("|", "/")
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 220 else text[:217] + "..."


@contextlib.contextmanager
def _bitcompile_warnings(sink: list[str]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", BitcompileWarning)
        yield
    sink.extend(_why(w.message) for w in caught if issubclass(w.category, BitcompileWarning))


def _fresh(arch: Arch, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return arch.build().eval()


def check_train(arch: Arch) -> str:
    model = _fresh(arch).train()
    x = _main_input(arch, model)
    args = _positional(arch, model, x)
    compiled = torch.compile(model, backend="bitcpm", options={"inner": "aot_eager"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    seen: list[str] = []
    records: list[Any] = []
    from bitcompile.backend import observe_compilations

    with _bitcompile_warnings(seen), observe_compilations(records.append):
        out = compiled(*args)
        loss = _first_output(out).float().pow(2).mean()
        loss.backward()
        optimizer.step()
    ternary = sum(d.rewritten for r in records for d in r.layers)
    if seen:
        return f"{FAIL} {seen[0]}"
    if not torch.isfinite(loss):
        return f"{FAIL} loss is {loss.item()}"
    moved = sum(not torch.equal(before[n], p) for n, p in model.named_parameters())
    if not ternary or not moved:
        return f"{FAIL} {ternary} ternary layers, {moved} parameters moved"
    return f"{OK} {ternary} ternary calls, loss {loss.item():.3g}"


def check_explain(arch: Arch) -> tuple[str, Any]:
    model = _fresh(arch)
    args = _positional(arch, model, _main_input(arch, model))
    report = bitcompile.explain(model, *args, inner="aot_eager")
    floats = sorted({_role(layer.reason) for layer in report.skipped})
    return f"{OK} {len(report.rewritten)} ternary, {len(report.skipped)} float ({', '.join(floats)})", report


def _role(reason: str) -> str:
    """``"output head: float by default ..."`` → ``"output head"``; other reasons: their first four words."""
    return reason.split(":")[0] if ":" in reason[:20] else " ".join(reason.split(" ")[:4]) + "…"


def check_experts(arch: Arch, report: Any) -> str:
    if not arch.moe:
        return NA
    model = _fresh(arch)
    experts = {n: p for n, p in model.named_parameters() if ".experts." in n and p.dim() == 3}
    total = sum(p.numel() for p in model.parameters())
    listed = {layer.weight_name for layer in report.layers} | {layer.name for layer in report.layers}
    covered = [n for n in experts if n in listed or n.rsplit(".", 1)[0] in listed]
    share = sum(p.numel() for p in experts.values()) / total
    if experts and len(covered) == len(experts):
        ternary = sum(layer.rewritten for layer in report.layers if ".experts" in layer.name)
        return f"{OK} {len(covered)} expert weights listed, {ternary} ternary"
    return f"{FAIL} explain lists {len(covered)} of {len(experts)} 3-D expert weights ({share:.0%} of the parameters)"


def check_pack(arch: Arch) -> tuple[str, torch.nn.Module]:
    """Pack with example inputs, save, load into a fresh model: every tensor and the outputs must match."""
    model = _fresh(arch)
    args = _positional(arch, model, _main_input(arch, model))
    seen: list[str] = []
    with _bitcompile_warnings(seen):
        packed = bitcompile.pack(model, example_inputs=args)
    with torch.no_grad():
        out = _first_output(packed(*args))
    count = sum(d.packed for d in packed.bitcompile_pack_plan)
    with tempfile.TemporaryDirectory() as folder:
        bitcompile.save_packed(packed, folder)
        loaded = bitcompile.load_packed(folder, lambda: _fresh(arch, seed=7))
    saved, reloaded = packed.state_dict(), loaded.state_dict()
    differing = [k for k in saved if k not in reloaded or not torch.equal(saved[k], reloaded[k])]
    if differing or set(reloaded) - set(saved):
        return f"{FAIL} reloaded tensors differ: {', '.join((differing or sorted(set(reloaded) - set(saved)))[:3])}", packed
    with torch.no_grad():
        again = _first_output(loaded(*args))
    note = f"; {seen[0]}" if seen else ""
    if not torch.equal(out, again):
        # pack serves its float layers with bitcompile's fp32 GEMV at <= 8 tokens, load_packed with F.linear
        diff = (out - again).abs().max().item()
        return f"{OK} {count} layers 2-bit, tensors bit-exact; outputs differ by {diff:.1e} (float-layer GEMV){note}", packed
    return f"{OK} {count} layers 2-bit, reload bit-exact{note}", packed


def _ort_parity(model: torch.nn.Module, x: torch.Tensor, packed: torch.nn.Module) -> str:
    """Export ``model`` (float: export_onnx packs a copy), run it in onnxruntime, compare with ``packed``."""
    import onnxruntime as ort

    from bitcompile.export.prepare import MainInputFirstOutput

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        result = bitcompile.export_onnx(model, (x,), path)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    wrapper = MainInputFirstOutput(packed) if hasattr(packed, "main_input_name") else packed
    with torch.no_grad():
        want = wrapper(x).float().numpy()
    diff = float(abs(got - want).max())
    scale = float(abs(want).max())
    ternary = sum(layer.kind != "float" for layer in result.layers)
    verdict = OK if diff <= PARITY_TOLERANCE * scale + 1e-6 else FAIL
    return f"{verdict} {result.inputs[0]} → {result.outputs[0]}, {ternary} 2-bit, max diff {diff:.1e} (max {scale:.2g})"


def check_onnx(arch: Arch, packed: torch.nn.Module) -> str:
    model = _fresh(arch)
    return _ort_parity(model, _main_input(arch, model), packed)


def check_onnx_encoder(arch: Arch, packed: torch.nn.Module) -> str:
    if arch.kind != "seq2seq":
        return NA
    model = _fresh(arch)
    return _ort_parity(model.get_encoder(), _main_input(arch, model), packed.get_encoder())


def check_generation(arch: Arch, packed: torch.nn.Module) -> str:
    if arch.kind not in ("causal", "seq2seq"):
        return NA
    x = _main_input(arch, packed, batch=1)
    steps = 4
    with torch.no_grad():
        generated = packed.generate(x, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        if arch.kind == "causal":
            tokens = x
            for _ in range(steps):
                logits = packed(tokens, use_cache=False).logits[:, -1]
                tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
        else:
            tokens = generated[:, :1]  # the decoder start (and forced) token
            for _ in range(generated.shape[1] - 1):
                logits = packed(x, decoder_input_ids=tokens, use_cache=False).logits[:, -1]
                tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    if not torch.equal(generated, tokens):
        return f"{FAIL} generate() {generated.tolist()} != greedy loop {tokens.tolist()}"
    return f"{OK} generate() == greedy loop without cache ({steps} tokens)"


def run_arch(arch: Arch) -> dict[str, str]:
    """Every column of one architecture's row; a check that raises becomes ❌ with its first line."""
    row: dict[str, str] = {}
    found: dict[str, Any] = {}  # the explain report and the packed model, for the checks that read them

    def cell(column: str, check: Callable[[], Any], needs: str | None = None) -> None:
        if needs is not None and needs not in found:
            row[column] = f"{FAIL} not run: the {needs} step failed"
            return
        try:
            value = check()
        except Exception as error:  # the cell says what failed; the sweep goes on
            row[column] = f"{FAIL} {_why(error)}"
            return
        if isinstance(value, tuple):
            value, found[column] = value
        row[column] = value

    cell("compile + train", lambda: check_train(arch))
    cell("explain", lambda: check_explain(arch))
    if arch.moe:
        cell("MoE experts", lambda: check_experts(arch, found["explain"]), needs="explain")
    else:
        row["MoE experts"] = NA
    cell("pack + save/load", lambda: check_pack(arch))
    packed = "pack + save/load"
    cell("ONNX + ORT", lambda: check_onnx(arch, found[packed]), needs=packed)
    if arch.kind == "seq2seq":
        cell("ONNX encoder", lambda: check_onnx_encoder(arch, found[packed]), needs=packed)
    else:
        row["ONNX encoder"] = NA
    if arch.kind in ("causal", "seq2seq"):
        cell("generation", lambda: check_generation(arch, found[packed]), needs=packed)
    else:
        row["generation"] = NA
    torch._dynamo.reset()
    return {column: row[column] for column in COLUMNS}


def render(rows: dict[str, dict[str, str]], seconds: float, runs: int = 1) -> str:
    import transformers

    lines = [
        "# Support matrix",
        "",
        "Written by `python benchmarks/support_matrix.py` (do not edit by hand): every architecture is",
        "built from a tiny random config and run through each step; a ❌ cell holds the first line of",
        "the error or BitcompileWarning that step raised. `–`: does not apply.",
        "",
        f"torch {torch.__version__}, transformers {transformers.__version__}, bitcompile {bitcompile.__version__}; "
        f"{len(rows)} architectures in {seconds:.0f} s of wall time"
        + (f" summed over {runs} runs made in parallel" if runs > 1 else "")
        + " (on a shared 2-core machine under heavy load: timings are not representative).",
        "",
        "Defaults: output heads and MoE routers stay float (`float_roles`), embeddings are float;",
        "`explain`'s float list names them. ONNX parity: onnxruntime vs the packed PyTorch model,",
        f"✅ under {PARITY_TOLERANCE:.0%} of the largest output.",
        "",
        "| architecture | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(row.get(c, "") for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="*", default=list(ARCHS), help=f"a subset of: {', '.join(ARCHS)}")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "support.md"))
    parser.add_argument("--json", help="also write the rows (and seconds) as JSON here")
    parser.add_argument("--merge", nargs="*", help="render --out from these --json files instead of running")
    args = parser.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(p).read_text()) for p in args.merge]
        rows = {name: part["rows"][name] for name in ARCHS for part in parts if name in part["rows"]}
        Path(args.out).write_text(render(rows, sum(part["seconds"] for part in parts), runs=len(parts)))
        print(f"wrote {args.out} ({len(rows)} architectures)")
        return 0
    unknown = [a for a in args.arch if a not in ARCHS]
    if unknown:
        parser.error(f"unknown architecture(s) {unknown}; choose from {', '.join(ARCHS)}")
    start = time.perf_counter()
    rows = {}
    for name in args.arch:
        t0 = time.perf_counter()
        rows[name] = run_arch(ARCHS[name])
        if args.json:  # after every architecture: a long sweep stopped halfway keeps its rows
            Path(args.json).write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", *(f"  {c}: {v}" for c, v in rows[name].items()), sep="\n", flush=True)
    seconds = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "seconds": seconds, "cpu_seconds": time.process_time()}))
    Path(args.out).write_text(render(rows, seconds))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
