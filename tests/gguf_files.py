"""Small real GGUF files for tests, cut from the packaged SmolLM2-135M checkpoint.

Loading the whole 30-layer checkpoint takes ~20 s (transformers' GGUF reader parses the
49152-token vocabulary twice); a file holding its first blocks and no tokenizer loads in a
few seconds and still exercises the real reader on real quantized (Q4_1 / Q8_0) weights.
"""

from __future__ import annotations

from pathlib import Path

import gguf


def write_gguf_slice(source: Path, destination: Path, blocks: int, keep_tokenizer: bool = False) -> Path:
    """Copy ``source`` keeping its first ``blocks`` decoder blocks (metadata adjusted), bytes unchanged."""
    reader = gguf.GGUFReader(source)
    architecture = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(destination, architecture)
    for field in reader.fields.values():
        if field.name == "general.architecture" or field.name.startswith("GGUF."):
            continue  # the writer adds these itself
        if field.name.startswith("tokenizer.") and not keep_tokenizer:
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        value = blocks if field.name == f"{architecture}.block_count" else field.contents()
        writer.add_key_value(field.name, value, value_type, sub_type=sub_type)
    kept = [t for t in reader.tensors if not t.name.startswith("blk.") or int(t.name.split(".")[1]) < blocks]
    for tensor in kept:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return destination
