"""DARE members as packed keep-masks over their expert.

A DARE member is ``theta0 + m * (theta_i - theta0) / (1 - p)``: beyond the base and the expert
the basis already holds, all it adds is the mask ``m``, one bit per parameter. The bits are
drawn exactly as ``merging.sparsify.dare`` draws them (``dare_mask`` with
``seeded_rng(seed, expert fingerprint, tensor name)``), packed little-endian (bit j of byte k
is entry 8k + j of the flattened tensor) and written once per (base, expert, p, seed) as a
safetensors file of uint8 tensors, one per floating tensor of the base.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from psomerge.errors import CheckpointError
from psomerge.hashing import digest
from psomerge.io import Model, StreamingSafetensorsWriter, check_finite
from psomerge.io.checkpoint import SAFETENSORS_SINGLE, tensor_spans
from psomerge.merging.sparsify import dare_mask
from psomerge.merging.task_vectors import seeded_rng

log = logging.getLogger(__name__)

MASK_FILE = "dare_mask.safetensors"
META_FILE = "dare_mask.json"


def packed_size(numel: int) -> int:
    return (numel + 7) // 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Boolean tensor -> uint8 bytes, little-endian bit order (entry 8k + j is bit j of byte k)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """The inverse of ``pack_bits`` on ``bits``' device: a flat boolean tensor of ``numel``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).reshape(-1)[:numel].bool()


class DareMask:
    """The keep-masks of one DARE member: ``bits(name)`` is tensor ``name``'s packed mask,
    memory-mapped from the mask file."""

    def __init__(self, folder: str | Path, drop_rate: float, name: str):
        self.folder = Path(folder)
        self.path = self.folder / MASK_FILE
        self.drop_rate = drop_rate
        self.keep = 1.0 - drop_rate
        self.name = name
        self._offsets = tensor_spans(self.path)
        size, needed = self.path.stat().st_size, max((end for _, end in self._offsets.values()), default=0)
        if size < needed:
            raise CheckpointError(f"DARE mask file {self.path} is truncated ({size} of {needed} bytes); "
                                  f"delete {self.folder} to redraw it")
        self._file: np.memmap | None = None

    @property
    def tensor_names(self) -> list[str]:
        return list(self._offsets)

    def nbytes(self, name: str) -> int:
        begin, end = self._span(name)
        return end - begin

    def bits(self, name: str) -> torch.Tensor:
        """Packed mask of tensor ``name`` (uint8, 1-D), a view of the memory-mapped file."""
        begin, end = self._span(name)
        if self._file is None:
            # copy-on-write: a writable view for torch, and nothing is ever written back
            self._file = np.memmap(self.path, dtype=np.uint8, mode="c")
        return torch.from_numpy(self._file[begin:end])

    def _span(self, name: str) -> tuple[int, int]:
        try:
            return self._offsets[name]
        except KeyError:
            raise CheckpointError(f"DARE mask file {self.path} has no tensor {name!r}") from None

    def check(self, shapes: dict[str, tuple[int, ...]]) -> None:
        """Every tensor's mask is there, with one bit per entry."""
        for name, shape in shapes.items():
            n = 1
            for d in shape:
                n *= d
            if self.nbytes(name) != packed_size(n):
                raise CheckpointError(f"DARE mask file {self.path}: tensor {name!r} has {self.nbytes(name)} bytes, "
                                      f"expected {packed_size(n)} for shape {list(shape)}; delete {self.folder}")

    def weight_files(self) -> list[Path]:
        return [self.path]

    def close(self) -> None:
        self._file = None


def mask_key(base_fingerprint: str, expert_fingerprint: str, drop_rate: float, seed: int) -> str:
    return digest([base_fingerprint, expert_fingerprint, drop_rate, seed], 12)


def dare_masks_for(
    cache_dir: str | Path,
    expert: Model,
    names: Sequence[str],
    base_fingerprint: str,
    expert_fingerprint: str,
    drop_rate: float,
    seed: int,
    on_tensor: Callable[[str], None] | None = None,
) -> DareMask:
    """The expert's DARE masks, written under ``cache_dir`` the first time (one folder per
    (base, expert, p, seed)) and reused after."""
    folder = Path(cache_dir) / f"mask-{mask_key(base_fingerprint, expert_fingerprint, drop_rate, seed)}"
    if not (folder / MASK_FILE).exists():
        log.info("writing DARE masks (p=%.2f) of %s to %s", drop_rate, expert.name, folder)
        _write_masks(folder, expert, names, expert_fingerprint, drop_rate, seed, on_tensor)
    mask = DareMask(folder, drop_rate, f"dare({expert.name})")
    mask.check({n: expert.info(n).shape for n in names})
    return mask


def _write_masks(folder: Path, expert: Model, names: Sequence[str], tag: str, drop_rate: float,
                 seed: int, on_tensor: Callable[[str], None] | None) -> None:
    """Stage the mask file beside ``folder`` and rename it into place when complete; a
    concurrent writer of the same masks (another worker) wins or loses the rename harmlessly."""
    plan = [(n, (packed_size(expert.info(n).numel),), torch.uint8) for n in names]
    staging = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with StreamingSafetensorsWriter(staging, plan, max_shard_bytes=1 << 62) as writer:
            for name in names:
                check_finite(expert.get(name), expert.name, name)  # as the dense DARE writer did
                writer.write(name, pack_bits(dare_mask(expert.info(name).shape, drop_rate,
                                                       seeded_rng(seed, tag, name))))
                if on_tensor:
                    on_tensor(name)
        expert.close()
        (staging / SAFETENSORS_SINGLE).rename(staging / MASK_FILE)
        (staging / META_FILE).write_text(json.dumps(
            {"expert": expert.name, "expert_fingerprint": tag, "drop_rate": drop_rate, "seed": seed}, indent=2))
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / MASK_FILE).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
