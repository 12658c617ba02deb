"""One safetensors file, memory-mapped read-write, whose tensors are written in place.

A particle is materialised straight into this file's pages (in /dev/shm where there is
one, so no disk is touched) and another process (the vLLM worker) reads the same file:
the weights cross the process boundary without a pipe, a pickle or a second copy in the
writer. The layout is fixed at creation, so every particle reuses the same pages.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from psomerge.io.checkpoint import DTYPE_TO_SAFETENSORS


def shared_memory_dir() -> Path:
    """/dev/shm where it is writable (RAM-backed), else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


class SharedWeights(Mapping[str, torch.Tensor]):
    """A mapping name -> tensor view into a memory-mapped safetensors file.

    ``plan`` lists (name, shape) of every tensor; all share ``dtype``, so every tensor's
    offset is a multiple of its element size.
    """

    def __init__(self, plan: Sequence[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 directory: str | Path | None = None):
        if dtype not in DTYPE_TO_SAFETENSORS:
            raise ValueError(f"no safetensors dtype for {dtype}")
        itemsize = torch.empty((), dtype=dtype).element_size()
        header: dict = {}
        offset = 0
        for name, shape in plan:
            nbytes = itemsize * _numel(shape)
            header[name] = {"dtype": DTYPE_TO_SAFETENSORS[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        data_start = 8 + len(raw)
        fd, name = tempfile.mkstemp(prefix="psomerge-weights-", suffix=".safetensors",
                                    dir=directory or shared_memory_dir())
        self.path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(data_start + offset)
            storage = torch.from_file(str(self.path), shared=True, size=data_start + offset, dtype=torch.uint8)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        self._tensors = {
            n: storage[data_start + h["data_offsets"][0] : data_start + h["data_offsets"][1]].view(dtype).view(tuple(h["shape"]))
            for n, h in header.items()
        }
        self.dtype = dtype

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def close(self) -> None:
        """Remove the file (pages still mapped here are freed when the views go)."""
        self._tensors = {}
        self.path.unlink(missing_ok=True)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
