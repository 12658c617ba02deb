"""Task vectors and the seeded randomness every sparsifier shares."""

from __future__ import annotations

import hashlib

import torch


def task_vector(expert: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """delta = theta_expert - theta_base, in fp32."""
    return expert.float() - base.float()


def tensor_seed(seed: int, *keys: object) -> int:
    """A 63-bit seed from a run seed and keys (model, tensor name).

    Keyed rather than sequential so each tensor's random mask is the same whatever order
    tensors are processed in, on whichever worker: a merge is reproducible.
    """
    text = "\x1f".join([str(seed), *map(str, keys)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def seeded_rng(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(tensor_seed(seed, *keys))
