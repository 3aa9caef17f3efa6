"""The ``bitcompile`` command line. Each subcommand is a thin shell over a Python function."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import bitcompile
from bitcompile.targets import target_names

Handler = Callable[[argparse.Namespace], int]


class UsageError(ValueError):
    """A command-line argument that cannot work (an output path that cannot be written, a
    count below 1), found before any work: one line on stderr, exit status 2."""


def _check_can_create(flag: str, path: Path, missing: Path) -> None:
    """``missing`` (``path`` or its folder) does not exist: its nearest existing ancestor must be a writable folder."""
    existing = missing
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {str(path)!r} cannot be written: {str(existing)!r} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {str(path)!r} cannot be written: permission denied on {str(existing)!r}")


def check_output_dir(flag: str, directory: str | os.PathLike) -> None:
    """Raise :class:`UsageError` unless ``directory`` is, or can be created as, a writable folder."""
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a file, not a folder")
    _check_can_create(flag, path, path)


def check_output_file(flag: str, file: str | os.PathLike) -> None:
    """Raise :class:`UsageError` unless ``file`` can be written (its folder is created if missing)."""
    path = Path(file)
    if path.is_dir():
        raise UsageError(f"{flag} {str(path)!r} is a folder; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {str(path)!r} cannot be written: permission denied")
    _check_can_create(flag, path, path.parent)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train a tiny Llama in fp32 and ternary side by side")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--out", default="bitcompile-demo", help="folder for the loss plot and report")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from bitcompile.demo import run_demo

        try:
            if args.steps < 1:
                raise UsageError(f"--steps {args.steps} is invalid: expected a positive number of training steps")
            check_output_dir("--out", args.out)
        except UsageError as error:
            print(f"bitcompile demo: error: {error}", file=sys.stderr)
            return 2
        run_demo(steps=args.steps, out_dir=args.out, inner=args.inner, seed=args.seed)
        return 0

    parser.set_defaults(handler=run)


_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


def _bool_options() -> set[str]:
    return {f.name for f in dataclasses.fields(bitcompile.TernaryConfig) if f.type in ("bool", bool)}


def parse_option(text: str) -> tuple[str, Any]:
    """``"group_size=128"`` → ``("group_size", 128)``; ``none``/``null`` → None; lists split on commas;
    ``freeze=true`` (and the other true/false words, any case) → a bool for bool options."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise bitcompile.TernaryConfigError(f"--option {text!r} is invalid: expected key=value, e.g. group_size=128")
    raw = raw.strip()
    value: Any
    if key in _bool_options():
        if raw.lower() not in _TRUE_WORDS + _FALSE_WORDS:
            raise bitcompile.TernaryConfigError(
                f"--option {text!r} is invalid: {key} expects true or false (also yes/no, on/off, 1/0)"
            )
        value = raw.lower() in _TRUE_WORDS
    elif key in ("exclude", "include", "float_roles"):
        value = [p.strip() for p in raw.split(",") if p.strip()]
    elif raw.lower() in ("none", "null"):
        value = None
    else:
        try:
            value = int(raw)
        except ValueError:
            value = raw
    return key, value


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def _capture_failure(model: Any, example_inputs: Sequence[Any], error: Exception) -> str:
    """Why a capture failed, in one line: the model's own error when it fails without Dynamo
    too (e.g. example inputs of the wrong shape), which Dynamo's first line does not say."""
    import torch

    try:
        with torch.no_grad():
            model(*example_inputs)
    except Exception as eager_error:
        return f"the model fails on its example inputs without torch.compile too: {_first_line(eager_error)}"
    return _first_line(error)


def _run_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console

    from bitcompile.inspect.mlir import MlirUnavailableError
    from bitcompile.model_loader import ModelLoadError, load_model

    try:
        options = dict(parse_option(text) for text in args.option)
        if args.target:
            options["target"] = args.target
        config = bitcompile.TernaryConfig.from_options(options)
        # before the capture, which can take minutes on a large model
        if args.json:
            check_output_file("--json", args.json)
        if args.html:
            check_output_dir("--html", args.html)
        if args.mlir:
            check_output_file("--mlir", args.mlir)
            from bitcompile.inspect.mlir import require_torch_mlir

            require_torch_mlir()  # say it is missing before the capture, not after
        model, example_inputs = load_model(args.model)
    except (ModelLoadError, bitcompile.TernaryConfigError, MlirUnavailableError, UsageError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"bitcompile inspect: error: {error}", file=sys.stderr)
        return 2
    try:
        report = bitcompile.explain(model, *example_inputs, **config.to_options())
    except Exception as error:  # Dynamo / user-model failures: one line unless --debug
        if args.debug:
            raise
        why = _capture_failure(model, example_inputs, error)
        print(f"bitcompile inspect: error: capturing {args.model!r} failed: {why}", file=sys.stderr)
        return 1
    # Colour and the terminal's width on a TTY; plain text wide enough not to fold paths otherwise.
    console = Console() if sys.stdout.isatty() else Console(width=200, color_system=None)
    report.render(console)
    if config.target == "cann":
        report.render_lowering(console)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report.to_json(), indent=2))
        console.print(f"wrote {path}")
    if args.html:
        from bitcompile.inspect.html import picture_error_line

        def picture_failed(index: int, error: Exception) -> None:
            if args.debug:
                traceback.print_exception(error)
            print(f"bitcompile inspect: warning: {picture_error_line(index, error)}", file=sys.stderr)

        try:
            page = report.to_html(args.html, title=f"bitcompile inspect {args.model}", on_picture_error=picture_failed)
        except Exception as error:  # the page itself (not one picture) failed: one line unless --debug
            if args.debug:
                raise
            first = (str(error).strip().splitlines() or [""])[0]
            print(f"bitcompile inspect: error: writing the HTML report failed: {type(error).__name__}: {first}", file=sys.stderr)
            return 1
        console.print(f"wrote {page}")
    if args.mlir:
        from bitcompile.inspect.mlir import write_mlir

        for path in write_mlir(model, example_inputs, args.mlir, config):
            console.print(f"wrote {path}")
    return 0


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what bitcpm does to a model: per-layer decisions, bytes, graphs (HTML, JSON, MLIR)",
        description="MODEL is 'module:function' returning (model, example_inputs), a local Hugging Face "
        "model folder (config.json + *.safetensors; needs transformers, never downloads), or a .gguf file "
        "(dequantized to float; needs transformers, gguf and accelerate).",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("--target", choices=target_names(), default=None)
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a bitcpm option, repeatable: group_size=128, activations=none, exclude=lm_head,*.router",
    )
    parser.add_argument("--html", metavar="DIR", help="write a self-contained HTML report (index.html) into DIR")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON (docs/report_schema.md)")
    parser.add_argument("--mlir", metavar="FILE", help="write the rewritten graph as torch-dialect MLIR (extra: mlir)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_run_inspect)


def _genai_tokenizer(args: argparse.Namespace) -> str | None:
    """``--tokenizer``, else the model folder when it holds a tokenizer (export_genai warns without one)."""
    if args.tokenizer is not None:
        return args.tokenizer
    folder = Path(args.model)
    has_tokenizer = folder.is_dir() and any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    return str(folder) if has_tokenizer else None


def _run_export_genai(args: argparse.Namespace) -> int:
    from bitcompile.export.genai import export_genai
    from bitcompile.export.onnx import OnnxExportError
    from bitcompile.model_loader import ModelLoadError, load_model

    if args.static or args.opset is not None:
        print("bitcompile export: error: --static and --opset do not apply to --format genai "
              "(batch and sequence stay dynamic; opset 21)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        options = dict(parse_option(text) for text in args.option)
        config = bitcompile.TernaryConfig.from_options(options) if options else None
        model, _ = load_model(args.model)
        result = export_genai(model, args.output, tokenizer=_genai_tokenizer(args), config=config, overwrite=args.overwrite)
    except (ModelLoadError, bitcompile.TernaryConfigError, OnnxExportError, OSError, ValueError, TypeError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"bitcompile export: error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0


def _run_export_for_runtimes(args: argparse.Namespace) -> int:
    """``--format gguf`` (llama.cpp) and ``--format hf-bitnet`` (transformers' BitNet checkpoints)."""
    import copy

    from bitcompile.model_loader import ModelLoadError, load_model

    try:
        options = dict(parse_option(text) for text in args.option)
        output = Path(args.output)
        if output.exists() and not args.overwrite and (output.is_file() or any(output.iterdir())):
            raise FileExistsError(f"{args.output!r} exists; pass --overwrite to replace it")
        model, _ = load_model(args.model)
    except (ModelLoadError, bitcompile.TernaryConfigError, OSError) as error:
        print(f"bitcompile export: error: {error}", file=sys.stderr)
        return 2
    try:
        if not any(isinstance(m, bitcompile.PackedTernaryLinear) for m in model.modules()):
            model = bitcompile.pack(copy.deepcopy(model), options or None)  # the caller's model stays as it was
        folder = Path(args.model)
        tokenizer = args.tokenizer or (str(folder) if (folder / "tokenizer.json").is_file() else None)
        if args.format == "gguf":
            from bitcompile.export.gguf import export_gguf

            result = export_gguf(
                model, output, tokenizer=tokenizer, tokenizer_pre=args.tokenizer_pre, ternary=args.ternary,
                fallback=args.fallback, float_type=args.float_type, overwrite=args.overwrite,
            )  # fmt: skip
            print(result.summary())
        else:
            from bitcompile.export.hf_bitnet import export_hf_bitnet

            if tokenizer is not None:
                import transformers

                tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
            export_hf_bitnet(model, output, tokenizer=tokenizer, lossy_scales=args.lossy_scales, overwrite=args.overwrite)
            print(f"wrote the HF BitNet checkpoint {output} (load with transformers or bitcompile.pack)")
    except (OSError, ValueError, TypeError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"bitcompile export: error: {error}", file=sys.stderr)
        return 1
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from bitcompile.export.onnx import OnnxExportError, check_ort_fusion, check_output_path, export_onnx

    if args.format == "genai":
        return _run_export_genai(args)
    from bitcompile.model_loader import ModelLoadError, load_model

    if args.format in ("gguf", "hf-bitnet"):
        return _run_export_for_runtimes(args)

    try:
        options = dict(parse_option(text) for text in args.option)
        config = bitcompile.TernaryConfig.from_options(options) if options else None
        check_output_path(args.output, args.overwrite)  # before loading (and packing) the model
        model, example_inputs = load_model(args.model)
    except (ModelLoadError, bitcompile.TernaryConfigError, OnnxExportError, OSError) as error:
        print(f"bitcompile export: error: {error}", file=sys.stderr)
        return 2
    try:
        result = export_onnx(
            model, example_inputs, args.output, format=args.format, opset=args.opset, config=config,
            overwrite=args.overwrite, dynamic_shapes=None if args.static else "auto",
        )  # fmt: skip
    except (OnnxExportError, OSError, ValueError, TypeError) as error:
        if args.debug:
            traceback.print_exc()
        print(f"bitcompile export: error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    if args.format == "qdq":
        fusion = check_ort_fusion(result.path)
        fused = len(fusion["ternary_layers"]) - len(fusion["unfused"])
        unfused = f"; NOT fused: {', '.join(fusion['unfused'])}" if fusion["unfused"] else ""
        print(f"onnxruntime fusion: {fused}/{len(fusion['ternary_layers'])} ternary layers run as MatMulNBits{unfused}")
    return 0


def _add_export(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a packed ternary model: ONNX for onnxruntime, GGUF for llama.cpp, or an HF BitNet checkpoint",
        description="MODEL is 'module:function' returning (model, example_inputs), a local Hugging Face "
        "model folder or a .gguf file. An unpacked model is packed first (a copy); see docs/onnx.md.",
    )
    parser.add_argument("model", metavar="MODEL")
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="the .onnx / .gguf file to write (genai, hf-bitnet: a folder)")  # fmt: skip
    parser.add_argument("--format", choices=("matmulnbits", "qdq", "genai", "gguf", "hf-bitnet"), default="matmulnbits",
                        help="com.microsoft::MatMulNBits (default, fastest), standard ONNX INT2 DequantizeLinear (opset 25), "
                        "genai: a folder for onnxruntime-genai (KV-cache model.onnx, genai_config.json, tokenizer; "
                        "transformers Llama models), GGUF for llama.cpp, or a Hugging Face BitNet checkpoint "
                        "(docs/deployment.md)")  # fmt: skip
    gguf_group = parser.add_argument_group("genai / gguf / hf-bitnet")
    gguf_group.add_argument("--tokenizer", metavar="DIR", default=None,
                            help="tokenizer folder (default: the MODEL folder's tokenizer)")  # fmt: skip
    gguf_group.add_argument("--tokenizer-pre", default=None, help="llama.cpp pre-tokenizer name, e.g. smollm")
    gguf_group.add_argument("--ternary", choices=("tq2_0", "tq1_0"), default="tq2_0", help="GGUF type when K %% 256 == 0")
    gguf_group.add_argument("--fallback", choices=("q4_0", "q8_0"), default="q4_0", help="GGUF type for other ternary layers")
    gguf_group.add_argument("--float-type", choices=("f32", "f16"), default="f32", help="GGUF type of the float embedding/head")
    gguf_group.add_argument("--lossy-scales", action="store_true",
                            help="hf-bitnet: write per-row/group layers with one mean scale instead of refusing")  # fmt: skip
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 21; qdq: 25)")
    parser.add_argument("--overwrite", action="store_true", help="replace FILE if it exists")
    parser.add_argument("--static", action="store_true", help="static input shapes (default: dynamic batch and sequence)")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="how to pack an unpacked model, repeatable: group_size=128, activations=none, exclude=lm_head",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.set_defaults(handler=_run_export)


#: Subcommand registrars; later subcommands (inspect, export, bench) add themselves here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo, _add_inspect]
SUBCOMMANDS.append(_add_export)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitcompile", description=bitcompile.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bitcompile {bitcompile.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (bitcompile.TernaryConfigError, FileNotFoundError, ValueError) as error:
        print(f"bitcompile {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
