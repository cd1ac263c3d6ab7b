"""Write output tensors as safetensors shards, streaming: one tensor in memory at a time.

The header of a safetensors file only needs names, dtypes and shapes, which the plan knows before any
tensor is read, so each tensor is written as soon as it is produced (no serialized copy of a shard).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .mapping import Recipe

DTYPE_NAMES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class OutTensor:
    """An output tensor as the header sees it."""

    recipe: Recipe
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def assign_shards(
    tensors: list[OutTensor], source_shard: dict[str, int], num_source_shards: int, max_bytes: int
) -> list[list[OutTensor]]:
    """Group output tensors into shards: like the source's shards when it has several, else by ``max_bytes``."""
    if num_source_shards > 1:
        groups: list[list[OutTensor]] = [[] for _ in range(num_source_shards)]
        for t in tensors:
            groups[source_shard[t.recipe.sources[0]]].append(t)
        return [g for g in groups if g]
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """transformers' file names: ``model.safetensors`` or ``model-00001-of-00003.safetensors``..."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{k + 1:05d}-of-{count:05d}.safetensors" for k in range(count)]


def write_shard(
    path: Path,
    tensors: list[OutTensor],
    produce: Callable[[OutTensor], torch.Tensor],
    on_tensor: Callable[[], None] | None = None,
) -> int:
    """Write one safetensors file, calling ``produce`` for each tensor in order; return the bytes of tensor data."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.recipe.name] = {
            "dtype": DTYPE_NAMES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors:
            value = produce(t)
            if value.dtype != t.dtype or tuple(value.shape) != t.shape:
                raise RuntimeError(
                    f"{t.recipe.name}: planned {t.dtype} {t.shape}, got {value.dtype} {tuple(value.shape)}"
                )
            f.write(value.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)
            if on_tensor is not None:
                on_tensor()
        f.flush()
    return offset


def write_index(folder: Path, shards: list[list[OutTensor]], names: list[str]) -> None:
    """``model.safetensors.index.json`` for a sharded checkpoint."""
    weight_map = {t.recipe.name: name for group, name in zip(shards, names) for t in group}
    total = sum(t.nbytes for group in shards for t in group)
    data = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(data, indent=2) + "\n")
