"""Write a .safetensors file for the tests: with the safetensors package when it is installed (an independent
implementation to check segtrain's reader against), else by the format's definition (8-byte little-endian
header length, JSON header of dtype / shape / data_offsets, the raw bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64", torch.uint8: "U8"}


def save_safetensors(state: dict[str, torch.Tensor], path: str | Path) -> None:
    state = {k: v.detach().contiguous() for k, v in state.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        save_file = None
    if save_file is not None:
        save_file(state, str(path))
        return
    header, blobs, offset = {}, [], 0
    for name, tensor in state.items():
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    Path(path).write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))
