"""The entries ``torch.argsort(w, descending=True)[:k]`` selects, without the full sort.

mergekit 0.1.5's TIES trim keeps exactly those entries of |delta|. Where several entries tie
at the k-th magnitude, which of them survive is that sort's choice, so a k-th value
threshold alone keeps others. torch's CPU sort (non-stable, float32) is libstdc++'s
``std::sort`` over (value, index) pairs with torch's descending comparator (NaN first, then
larger values): an introsort (median-of-three Hoare partitions down to segments of 16, a
heapsort past a depth limit of 2·floor(log2 n), a final insertion sort). Entries never cross
a partition cut, so the first k positions are decided by the partitions of the segments
holding position k alone: replaying exactly those steps is a quickselect with std::sort's
own pivot and partition rules, expected linear time instead of n log n. Should a segment
reach the depth limit (heapsort, adversarial inputs only), the full argsort is run instead.

``tests/test_topk.py`` checks the replay against ``torch.argsort`` itself.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch

log = logging.getLogger(__name__)

INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold: segments this small are insertion-sorted

_KERNEL: list = []  # the compiled replay, once per process ([None] without numba)
_KERNEL_LOCK = threading.Lock()


def depth_limit(n: int) -> int:
    """std::sort's recursion budget for n elements: 2 * floor(log2(n))."""
    return 2 * (n.bit_length() - 1)


def argsort_topk_mask(values: torch.Tensor, k: int, *, depth: int | None = None) -> torch.Tensor:
    """Boolean mask (shape of ``values``) of the entries ``torch.argsort(values.reshape(-1),
    descending=True)[:k]`` selects on the CPU, ties included. ``depth`` overrides the
    introsort depth limit (tests use it to reach the heapsort fallback)."""
    flat = values.detach().reshape(-1).to("cpu", torch.float32)
    n = flat.numel()
    if k >= n:
        return torch.ones(values.shape, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool)
    if k <= 0:
        return mask.reshape(values.shape)
    kernel = _replay_kernel()
    chosen = None
    if kernel is not None:
        index_dtype = np.int32 if n < 2**31 else np.int64
        work = flat.numpy().copy()
        index = np.arange(n, dtype=index_dtype)
        if kernel(work, index, k, depth_limit(n) if depth is None else depth):
            chosen = torch.from_numpy(index[:k].astype(np.int64, copy=False))
    if chosen is None:  # no numba, or the heapsort branch: the sort itself decides
        log.debug("top-%d of %d entries by full argsort", k, n)
        chosen = torch.argsort(flat, descending=True)[:k]
    mask[chosen] = True
    return mask.reshape(values.shape)


def _replay_kernel():
    with _KERNEL_LOCK:
        if not _KERNEL:
            _KERNEL.append(_compile())
    return _KERNEL[0]


def _compile():
    try:
        import numba
    except ImportError:
        log.info("numba is not installed: TIES top-k falls back to a full argsort")
        return None

    @numba.njit(inline="always")
    def before(a, b):
        """torch's descending comparator: NaN before numbers, then larger before smaller."""
        return (a != a and b == b) or a > b

    @numba.njit(inline="always")
    def swap(v, ix, i, j):
        v[i], v[j] = v[j], v[i]
        ix[i], ix[j] = ix[j], ix[i]

    @numba.njit(nogil=True)
    def replay(v, ix, k, depth):
        """Reorder (v, ix) as std::sort would, only as far as position k needs; True when
        ix[:k] then holds the selection, False where std::sort would heapsort."""
        first, last = 0, v.shape[0]
        while last - first > INSERTION_THRESHOLD:
            if depth == 0:
                return False
            depth -= 1
            # __move_median_to_first(first, first + 1, mid, last - 1)
            a, b, c = first + 1, first + (last - first) // 2, last - 1
            if before(v[a], v[b]):
                if before(v[b], v[c]):
                    m = b
                elif before(v[a], v[c]):
                    m = c
                else:
                    m = a
            elif before(v[a], v[c]):
                m = a
            elif before(v[b], v[c]):
                m = c
            else:
                m = b
            swap(v, ix, first, m)
            # __unguarded_partition(first + 1, last, pivot = first)
            pivot = v[first]
            lo, hi = first + 1, last
            while True:
                while before(v[lo], pivot):
                    lo += 1
                hi -= 1
                while before(pivot, v[hi]):
                    hi -= 1
                if lo >= hi:
                    break
                swap(v, ix, lo, hi)
                lo += 1
            # the loop continues on [first, cut) and recurses on [cut, last), both with `depth`
            if k < lo:
                last = lo
            elif k > lo:
                first = lo
            else:
                return True
        # the final insertion sort, restricted to the segment holding position k
        for i in range(first + 1, last):
            val, vi = v[i], ix[i]
            j = i
            while j > first and before(val, v[j - 1]):
                v[j], ix[j] = v[j - 1], ix[j - 1]
                j -= 1
            v[j], ix[j] = val, vi
        return True

    return replay
