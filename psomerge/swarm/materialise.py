"""Weighted sums of basis members into a target tensor, in place: the inner loop of
materialising a particle.

``fused_sum_into`` is one compiled pass (numba: read K members, write once); where it does
not apply (no numba, not CPU fp32) ``weighted_sum_into`` does one multiply and K - 1 fused
in-place adds. Neither allocates a temporary of the tensor's size.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def writable_tensors(target: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Name -> tensor to write into: a model's parameters (tied ones under every name), or
    the mapping itself."""
    if isinstance(target, torch.nn.Module):
        return {n: p.data for n, p in target.named_parameters(remove_duplicate=False)}
    return target


def fused_sum_into(out: torch.Tensor, stacked: torch.Tensor, alpha: Sequence[float]) -> bool:
    """out = sum_j alpha_j * stacked[j] in one pass (read K, write once) with a compiled CPU
    kernel. False where it does not apply (no numba, not CPU fp32), so the caller falls back."""
    kernel = _fused_kernel(len(alpha))
    if kernel is None or out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return False
    rows = [stacked[j].reshape(-1).numpy() for j in range(len(alpha))]
    with _KERNEL_LOCK:  # the kernel already uses every core; numba's default pool is not re-entrant
        kernel(out.view(-1).numpy(), *rows, np.asarray(alpha, dtype=np.float32))
    return True


_KERNELS: dict[int, object] = {}
_KERNEL_LOCK = threading.Lock()


def _fused_kernel(k: int):
    """A numba kernel summing exactly k rows, generated once per k: one-dimensional rows with
    the sum written out term by term vectorise, where a 2-D indexed loop does not."""
    if k not in _KERNELS:
        try:
            import numba
        except ImportError:
            _KERNELS[k] = None
            return None
        args = ", ".join(f"b{j}" for j in range(k))
        terms = " + ".join(f"a[{j}] * b{j}[i]" for j in range(k))
        src = f"def fused(out, {args}, a):\n    for i in numba.prange(out.shape[0]):\n        out[i] = {terms}\n"
        namespace: dict = {"numba": numba}
        exec(src, namespace)  # noqa: S102 - generated from integers only
        _KERNELS[k] = numba.njit(parallel=True, fastmath=False, nogil=True)(namespace["fused"])
    return _KERNELS[k]


def weighted_sum_into(out: torch.Tensor, tensors: torch.Tensor | Sequence[torch.Tensor], alpha: Sequence[float]) -> None:
    """out = sum_j alpha_j * tensors[j], in place: one multiply, then fused adds."""
    first = tensors[0]
    if first.dtype == out.dtype:
        torch.mul(first, alpha[0], out=out)
    else:  # a bf16 memory-mapped basis member into an fp32 model
        out.copy_(first).mul_(alpha[0])
    for t, a in zip(tensors[1:], alpha[1:]):
        if a != 0.0:
            out.add_(t, alpha=a)
