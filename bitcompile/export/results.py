"""What :func:`~bitcompile.export.onnx.export_onnx` gives back: the file's layers and sizes, or the error."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

Format = Literal["matmulnbits", "qdq"]
FORMATS = ("matmulnbits", "qdq")


class OnnxExportError(RuntimeError):
    """The model could not be exported; the message names the layer or node and what to do."""


@dataclasses.dataclass
class ExportedLayer:
    """One linear layer of the exported model and how it was written."""

    name: str
    in_features: int
    out_features: int
    kind: str  # "matmulnbits" | "qdq" (ternary) or "float"
    reason: str = ""  # why a layer stayed float
    group_size: str = ""
    block_size: int = 0
    activations: str = ""
    onnx_bytes: int = 0  # bytes of its weight + scale initializers in the file

    @property
    def ternary(self) -> bool:
        return self.kind in FORMATS

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.in_features * self.out_features


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the file, every linear layer, the checker result."""

    path: Path
    format: str
    opset: int
    layers: list[ExportedLayer]
    file_bytes: int
    check: str
    inputs: list[str]
    outputs: list[str]
    packed_copy: bool  # True when the model was unpacked and a packed copy was exported

    @property
    def ternary_layers(self) -> list[ExportedLayer]:
        return [layer for layer in self.layers if layer.ternary]

    @property
    def float_layers(self) -> list[ExportedLayer]:
        return [layer for layer in self.layers if not layer.ternary]

    @property
    def ternary_weight_bytes(self) -> int:
        return sum(layer.onnx_bytes for layer in self.ternary_layers)

    @property
    def ternary_fp32_bytes(self) -> int:
        return sum(layer.fp32_bytes for layer in self.ternary_layers)

    @property
    def fp32_file_bytes_estimate(self) -> int:
        """The file size with the ternary layers' weights written as fp32 (an fp32 export's size)."""
        return self.file_bytes - self.ternary_weight_bytes + self.ternary_fp32_bytes

    def summary(self) -> str:
        lines = [f"wrote {self.path} ({self.format}, opset {self.opset})"]
        lines.append(f"inputs: {', '.join(self.inputs)}; outputs: {', '.join(self.outputs)}")
        if self.packed_copy:
            lines.append("the model was not packed: exported a packed copy (your model is unchanged)")
        lines.append(f"ternary layers: {len(self.ternary_layers)}")
        for layer in self.ternary_layers:
            lines.append(
                f"  {layer.name:<40} {layer.out_features}x{layer.in_features}  {layer.group_size} scales, "
                f"block {layer.block_size}, activations {layer.activations}, {layer.onnx_bytes:,} B"
            )
        lines.append(f"float layers: {len(self.float_layers)}")
        for layer in self.float_layers:
            lines.append(f"  {layer.name:<40} {layer.out_features}x{layer.in_features}  {layer.reason}")
        ratio = self.ternary_fp32_bytes / max(self.ternary_weight_bytes, 1)
        lines.append(
            f"ternary weights: {self.ternary_weight_bytes:,} B (fp32: {self.ternary_fp32_bytes:,} B, {ratio:.1f}x smaller)"
        )
        file_ratio = self.fp32_file_bytes_estimate / max(self.file_bytes, 1)
        lines.append(
            f"file size: {self.file_bytes:,} B (an fp32 export: about {self.fp32_file_bytes_estimate:,} B, "
            f"{file_ratio:.1f}x larger)"
        )
        lines.append(f"onnx.checker.check_model(full_check=True): {self.check}")
        return "\n".join(lines)
