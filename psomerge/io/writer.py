"""Streaming sharded safetensors output.

The layout (shards, headers, offsets) is planned from the tensor names, shapes and
dtypes before any data exists, so each merged tensor goes to its place on disk as soon
as it is computed: a merge never holds more than one output tensor in memory (mergekit
buffers a whole shard).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from psomerge.errors import CheckpointError
from psomerge.io.checkpoint import DTYPE_TO_SAFETENSORS, SAFETENSORS_INDEX, SAFETENSORS_SINGLE

DEFAULT_SHARD_BYTES = 2 * 1024**3

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


@dataclass
class _Shard:
    file: str
    header: dict = field(default_factory=dict)
    data_start: int = 0
    data_size: int = 0


class StreamingSafetensorsWriter:
    """Writes tensors, in any order, into safetensors shards planned up front.

    ``plan`` lists (name, shape, dtype) of every tensor the output will hold.
    """

    def __init__(
        self,
        out_dir: str | Path,
        plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._where: dict[str, tuple[int, int, int, tuple[int, ...], torch.dtype]] = {}
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype, int]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in plan:
            nbytes = _numel(shape) * _itemsize(dtype)
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            shard_bytes += nbytes
        self._shards: list[_Shard] = []
        n = len(shards)
        for i, entries in enumerate(shards):
            fname = SAFETENSORS_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            shard = _Shard(fname)
            offset = 0
            header: dict = {"__metadata__": {"format": "pt"}}
            for name, shape, dtype, nbytes in entries:
                if dtype not in DTYPE_TO_SAFETENSORS:
                    raise CheckpointError(f"tensor {name!r}: dtype {dtype} cannot be written")
                header[name] = {
                    "dtype": DTYPE_TO_SAFETENSORS[dtype],
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                self._where[name] = (i, offset, nbytes, shape, dtype)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # data stays 8-byte aligned
            shard.header = header
            shard.data_start = 8 + len(raw)
            shard.data_size = offset
            path = self.out_dir / fname
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(shard.data_start + offset)
            self._shards.append(shard)
        self._files = [open(self.out_dir / s.file, "r+b") for s in self._shards]
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            i, offset, nbytes, shape, dtype = self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the planned output") from None
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise CheckpointError(
                f"tensor {name!r}: planned {list(shape)} {dtype}, got {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        assert data.nbytes == nbytes
        f = self._files[i]
        f.seek(self._shards[i].data_start + offset)
        f.write(memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise CheckpointError(
                f"output {self.out_dir}: {len(missing)} planned tensor(s) never written, e.g. {missing[:3]}"
            )
        if len(self._shards) > 1:
            index = {
                "metadata": {"total_size": sum(s.data_size for s in self._shards)},
                "weight_map": {n: self._shards[w[0]].file for n, w in self._where.items()},
            }
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for f in self._files:
                f.close()


def copy_model_files(base_dir: str | Path, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Copy config (with the output dtype), generation config and tokenizer files of the base."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((base_dir / "config.json").read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config["dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for fname in ("generation_config.json", *TOKENIZER_FILES):
        src = base_dir / fname
        if src.exists():
            shutil.copyfile(src, out_dir / fname)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


__all__ = ["StreamingSafetensorsWriter", "copy_model_files", "DEFAULT_SHARD_BYTES"]
