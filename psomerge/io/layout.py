"""The byte layout of a safetensors file, planned from names, shapes and dtypes alone.

Both writers (the streaming checkpoint writer and the shared weight file a vLLM engine
reloads from) plan a file's header and offsets before any tensor exists, so each tensor can
be written straight to its place.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from psomerge.errors import CheckpointError
from psomerge.io.checkpoint import DTYPE_TO_SAFETENSORS


@dataclass(frozen=True)
class Slot:
    offset: int  # from the start of the data section
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class FileLayout:
    prefix: bytes  # 8-byte header length, then the JSON header padded to 8 bytes
    slots: dict[str, Slot]
    data_size: int

    @property
    def data_start(self) -> int:
        return len(self.prefix)

    @property
    def size(self) -> int:
        return len(self.prefix) + self.data_size


def numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def plan_file(entries: Sequence[tuple[str, Sequence[int], torch.dtype]]) -> FileLayout:
    """Header and offsets of a file holding ``entries`` (name, shape, dtype) in order."""
    header: dict = {"__metadata__": {"format": "pt"}}
    slots: dict[str, Slot] = {}
    offset = 0
    for name, shape, dtype in entries:
        if dtype not in DTYPE_TO_SAFETENSORS:
            raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written as safetensors")
        nbytes = numel(shape) * itemsize(dtype)
        header[name] = {"dtype": DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        slots[name] = Slot(offset, nbytes, tuple(int(d) for d in shape), dtype)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data starts 8-byte aligned
    return FileLayout(struct.pack("<Q", len(raw)) + raw, slots, offset)
