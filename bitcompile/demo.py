"""``bitcompile demo``: train a tiny Llama in fp32 and ternary side by side.

Both runs start from the same weights and see the same batches of generated text; the
ternary run is the same model under ``torch.compile(backend="bitcpm")``. Prints both loss
curves, the explain summary, a greedy sample from each, and saves a PNG plot.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import bitcompile
from bitcompile.data.synthetic_text import CharTokenizer, make_text, random_batches
from bitcompile.models import TinyLlama, TinyLlamaConfig, greedy_generate

BATCH, SEQ, LR = 16, 64, 3e-3


class MissingExtraError(ImportError, ValueError):
    """An optional dependency of the demo is not installed; the message names the extra that installs it.

    A ``ValueError`` too, so the command line prints it as its one-line error.
    """


def require_matplotlib() -> None:
    """Raise :class:`MissingExtraError` unless matplotlib (the ``demo`` extra) can be imported.

    Checked before training, so a missing plot library does not cost a whole run.
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise MissingExtraError(
            "the demo plots its loss curves with matplotlib, which is not installed: pip install 'bitcompile[demo]'",
            name="matplotlib",
        )


def train(
    model: torch.nn.Module, forward: Callable, tokens: torch.Tensor, steps: int, seed: int
) -> tuple[list[float], float]:
    """AdamW on next-character prediction; returns (losses per step, seconds)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    start = time.perf_counter()
    for inputs, targets in random_batches(tokens, BATCH, SEQ, steps, seed=seed):
        loss = F.cross_entropy(forward(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, time.perf_counter() - start


def _plot(fp32: list[float], ternary: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(fp32, label="fp32 (eager)")
    ax.plot(ternary, label='ternary (torch.compile backend="bitcpm")')
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title("Tiny Llama on generated text")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(steps: int = 200, out_dir: str | Path = "bitcompile-demo", inner: str = "inductor", seed: int = 0) -> dict:
    """Run the demo; returns the summary that is also written to ``out_dir/summary.json``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"run_demo: steps={steps!r} is invalid: expected a positive int")
    require_matplotlib()
    console = Console()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = make_text(seed=seed)
    tokenizer = CharTokenizer(text)
    tokens = tokenizer.encode(text)
    torch.manual_seed(seed)
    config = TinyLlamaConfig(vocab_size=tokenizer.vocab_size)
    fp32_model = TinyLlama(config)
    ternary_model = copy.deepcopy(fp32_model)

    example = tokens[:SEQ].unsqueeze(0)
    report = bitcompile.explain(ternary_model, example)
    report.render(console)

    console.print(f"[bold]Training fp32 (eager) for {steps} steps...[/bold]")
    fp32_losses, fp32_time = train(fp32_model, fp32_model, tokens, steps, seed)
    console.print(f'[bold]Training ternary (backend="bitcpm", inner={inner}) for {steps} steps...[/bold]')
    compiled = torch.compile(ternary_model, backend="bitcpm", options={"inner": inner})
    ternary_losses, ternary_time = train(ternary_model, compiled, tokens, steps, seed)

    table = Table(title="training loss")
    for column in ("step", "fp32", "ternary"):
        table.add_column(column, justify="right")
    shown = sorted({0, *range(max(steps // 10 - 1, 0), steps, max(steps // 10, 1)), steps - 1})
    for step in shown:
        table.add_row(str(step + 1), f"{fp32_losses[step]:.3f}", f"{ternary_losses[step]:.3f}")
    console.print(table)

    tail = max(steps // 10, 1)
    final_fp32 = sum(fp32_losses[-tail:]) / tail
    final_ternary = sum(ternary_losses[-tail:]) / tail
    prompt = tokens[:SEQ].unsqueeze(0)
    fp32_model.eval(), ternary_model.eval()
    samples = {
        name: tokenizer.decode(greedy_generate(forward, prompt, 48, window=SEQ)[0, SEQ:])
        for name, forward in (("fp32", fp32_model), ("ternary", compiled))
    }
    summary = {
        "steps": steps,
        "final_loss_fp32": final_fp32,
        "final_loss_ternary": final_ternary,
        "final_loss_ratio": final_ternary / final_fp32,
        "seconds_fp32": fp32_time,
        "seconds_ternary_including_compile": ternary_time,
        "layers_rewritten": len(report.rewritten),
        "layers_skipped": {layer.name: layer.reason for layer in report.skipped},
        "samples": samples,
        "losses": {"fp32": fp32_losses, "ternary": ternary_losses},
    }
    _plot(fp32_losses, ternary_losses, out / "loss_curves.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    report.save(out / "report")
    console.print(
        f"final loss (mean of last {tail} steps): fp32 {final_fp32:.3f}, ternary {final_ternary:.3f} "
        f"(ratio {final_ternary / final_fp32:.2f}); time fp32 {fp32_time:.1f}s, ternary {ternary_time:.1f}s incl. compile"
    )
    for name, sample in samples.items():
        console.print(f"{name:>8} sample: {sample!r}")
    console.print(f"wrote {out / 'loss_curves.png'}, {out / 'summary.json'} and {out / 'report'}/")
    return summary

