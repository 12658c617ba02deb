"""One safetensors file, memory-mapped read-write, whose tensors are written in place.

A particle is materialised straight into this file's pages (in /dev/shm where there is
one, so no disk is touched) and another process (the vLLM worker) reads the same file:
the weights cross the process boundary without a pipe, a pickle or a second copy in the
writer. The layout is fixed at creation, so every particle reuses the same pages.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch

from psomerge.io.layout import plan_file


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
        layout = plan_file([(name, shape, dtype) for name, shape in plan])
        fd, name = tempfile.mkstemp(prefix="psomerge-weights-", suffix=".safetensors",
                                    dir=directory or shared_memory_dir())
        self.path = Path(name)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(layout.prefix)
                f.truncate(layout.size)
            storage = torch.from_file(str(self.path), shared=True, size=layout.size, dtype=torch.uint8)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        start = layout.data_start
        self._tensors = {n: storage[start + s.offset: start + s.offset + s.nbytes].view(dtype).view(s.shape)
                         for n, s in layout.slots.items()}
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
