"""Pretrained weights from a local file: ``model.pretrained=PATH``.

``PATH`` is one of

* a PyTorch file (``.pth``, ``.pt``, ``.bin``): a state dict, or a dict holding one under ``state_dict``,
  ``model`` or ``module`` (mmseg, segtrain, DeiT ...), read with ``torch.load(weights_only=True)``;
* a ``.safetensors`` file, read by :func:`read_safetensors` (no dependency on the ``safetensors`` package);
* a folder (a Hugging Face checkpoint): ``model.safetensors``, ``pytorch_model.bin``, or their sharded
  forms (``*.index.json``).

:func:`match` then finds the file's tensors for a module by name: the file's names may carry a prefix
(``module.``, ``backbone.``, ``encoder.``, ``model.backbone.`` ...); the prefix under which most names are
the module's wins.  Tensors the module lacks (a classifier, another network's head) are left out; a tensor
the module needs that the file lacks, or one of another shape, is a one-line ConfigError that says how
many matched and names the first missing ones.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from segtrain import checkpoint
from segtrain.errors import CheckpointError, ConfigError

log = logging.getLogger("segtrain")

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what a Hugging Face checkpoint folder holds


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file: an 8-byte little-endian header length, a JSON header
    ``{name: {dtype, shape, data_offsets: [begin, end]}}`` (offsets into the bytes after the header), the bytes.

    Nothing in the file is executed; a header that does not describe the file is a ConfigError."""
    path = Path(path)
    data = bytearray(path.read_bytes())  # writable: torch.frombuffer shares it without a warning
    bad = f"{path} is not a valid .safetensors file"
    if len(data) < 8:
        raise ConfigError(f"{bad} (only {len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ConfigError(f"{bad} (its header length {n} exceeds the file)")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{bad} (header: {e})") from None
    if sys.byteorder != "little":
        raise ConfigError(f"{path}: reading .safetensors files needs a little-endian machine")
    start, size = 8 + n, len(data) - 8 - n
    out = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = SAFETENSORS_DTYPES[spec["dtype"]], spec["shape"], spec["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"{bad} (tensor {name!r}: unsupported entry {spec!r:.80})") from None
        count = 1
        for d in shape:
            count *= int(d)
        if not 0 <= begin <= end <= size or end - begin != count * dtype.itemsize:
            raise ConfigError(f"{bad} (tensor {name!r}: offsets {begin}..{end} do not hold {shape} {spec['dtype']})")
        offset = start + begin
        if count == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        tensor = torch.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        out[name] = tensor.clone() if offset % dtype.itemsize else tensor  # a copy aligns a misaligned tensor
    return out


def _torch_file(path: Path) -> dict[str, torch.Tensor]:

    obj = checkpoint.load(path, require_model=False)  # weights_only=True; one-line CheckpointError
    for key in ("state_dict", "model", "module"):  # mmseg/mmengine, segtrain/DeiT, DeepSpeed-style wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ConfigError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _sharded(folder: Path, index: Path) -> dict[str, torch.Tensor]:
    try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"cannot read {index} ({type(e).__name__}: {e})") from None
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(read_weights(folder / name))
    return out


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or Hugging Face checkpoint folder (see the module docstring)."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in HF_FILES:
            if (path / name).is_file():
                return read_weights(path / name)
            if (path / f"{name}.index.json").is_file():
                return _sharded(path, path / f"{name}.index.json")
        raise ConfigError(f"model.pretrained={path}: the folder holds neither {' nor '.join(HF_FILES)} (nor shards)")
    if not path.is_file():
        raise ConfigError(f"model.pretrained={path}: no such file or folder")
    try:
        state = read_safetensors(path) if path.suffix == ".safetensors" else _torch_file(path)
    except CheckpointError as e:
        raise ConfigError(f"model.pretrained: {e}") from None
    except OSError as e:
        raise ConfigError(f"model.pretrained={path}: cannot read it ({e.strerror or e})") from None
    if not state:
        raise ConfigError(f"model.pretrained={path} holds no tensors")
    return state


def _best_prefix(names: Iterable[str], wanted: Mapping[str, object]) -> tuple[str, int]:
    """(prefix, matches): the prefix (up to three dotted parts, or none) under which most ``names`` are in
    ``wanted``."""
    names = list(names)
    candidates = {""}
    for name in names:
        parts = name.split(".")
        candidates.update(".".join(parts[:i]) + "." for i in range(1, min(4, len(parts))))
    scored = [(sum(n.startswith(p) and n[len(p) :] in wanted for n in names), -len(p), p) for p in candidates]
    hits, _, prefix = max(scored)
    return prefix, hits


def _listed(items: list[str], limit: int = 3) -> str:
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def match(
    state: Mapping[str, torch.Tensor],
    wanted: Mapping[str, torch.Size],
    what: str,
    source: str,
    optional: tuple[str, ...] = (),
    check_shapes: bool = True,
    file_tensors: int | None = None,
) -> dict[str, torch.Tensor]:
    """``state``'s tensors for ``wanted`` (name -> shape), by name under the best prefix; ConfigError (one line)
    when a wanted tensor whose name starts with none of ``optional`` is missing or (``check_shapes``) of another
    shape.  ``file_tensors``: the file's count to report, when ``state`` is a renamed selection of it."""
    prefix, _ = _best_prefix(state, wanted)
    found = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix) and k[len(prefix) :] in wanted}
    required = [k for k in wanted if not k.startswith(optional)] if optional else list(wanted)
    missing = [k for k in required if k not in found]
    shapes = [
        f"{k} {list(found[k].shape)} (needs {list(wanted[k])})"
        for k in required
        if check_shapes and k in found and tuple(found[k].shape) != tuple(wanted[k])
    ]
    if missing or shapes:
        hits = len(required) - len(missing) - len(shapes)
        where = f" under the prefix '{prefix}'" if prefix else ""
        for limit in (3, 1):
            problem = f"missing {_listed(missing, limit)}" if missing else f"shape differs: {_listed(shapes, 1)}"
            msg = (
                f"model.pretrained={source}: {hits} of the {len(required)} tensors of {what} match the file's "
                f"{len(state) if file_tensors is None else file_tensors}{where}; {problem}; is it a checkpoint of {what}?"
            )
            if len(msg) <= 300:
                break
        raise ConfigError(msg)
    if prefix:
        log.debug("model.pretrained=%s: names under '%s'", source, prefix)
    return found
