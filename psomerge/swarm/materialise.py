"""Weighted sums of basis members into a target tensor, in place: the inner loop of
materialising a particle.

``masked_sum_into`` is the default layout's sum: base, experts and extra members in their
stored dtype (fp32 or bf16) plus the packed DARE keep-masks, in one compiled pass (numba:
read the members and the mask bits, write once); elsewhere (a GPU, another dtype, no numba)
the same sum in torch, chunk by chunk, with the same roundings in the same order: both give
the same bits, wherever they run. ``fused_sum_into`` is the one-pass sum over K stacked
fp32 members (the ``ram_dense`` layout); where it does not apply ``weighted_sum_into`` does one
multiply and K - 1 fused in-place adds. None allocates a temporary of the tensor's size.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from psomerge.errors import CheckpointError
from psomerge.swarm.masks import unpack_bits


def writable_tensors(target: torch.nn.Module | Mapping[str, torch.Tensor],
                     names: Sequence[str] | None = None) -> Mapping[str, torch.Tensor]:
    """Name -> tensor to write into: a model's parameters (tied ones under every name, each also
    under its name without the model's ``base_model_prefix``, as checkpoints such as GPT-2's on
    the hub store them: ``h.0.attn.c_attn.weight`` for ``transformer.h.0.attn.c_attn.weight``),
    or the mapping itself. With ``names`` (the checkpoint tensors to be written), a model
    parameter none of them reaches is an error: it would keep its old weights unnoticed."""
    if not isinstance(target, torch.nn.Module):
        return target
    tensors = {n: p.data for n, p in target.named_parameters(remove_duplicate=False)}
    prefix = f"{getattr(target, 'base_model_prefix', '')}."
    if prefix != ".":
        for n, t in list(tensors.items()):
            if n.startswith(prefix):
                tensors.setdefault(n[len(prefix):], t)
    if names is not None:
        reached = {tensors[n].data_ptr() for n in names if n in tensors}
        missed = [n for n, p in target.named_parameters() if p.data_ptr() not in reached]
        if missed:
            shown = ", ".join(repr(n) for n in missed[:3]) + (f" and {len(missed) - 3} more" if len(missed) > 3 else "")
            raise CheckpointError(
                f"{type(target).__name__}: no checkpoint tensor matches parameter(s) {shown} (checkpoint names "
                f"look like {', '.join(repr(n) for n in list(names)[:2])}): their weights could not be written. "
                "transformers renames or fuses some weights when it loads them (GPT-NeoX's embed_out, fused MoE "
                "experts), which this resident model does not follow: such architectures are not supported here")
    return tensors


def _numba():
    """numba, or None where it is not installed (the torch sums run then)."""
    try:
        import numba
    except ImportError:
        return None
    return numba


def compiled_kernels() -> bool:
    """Whether the compiled kernels can run here (numba importable); the torch sums run otherwise."""
    return _numba() is not None


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
        numba = _numba()
        if numba is None:
            _KERNELS[k] = None
            return None
        args = ", ".join(f"b{j}" for j in range(k))
        terms = " + ".join(f"a[{j}] * b{j}[i]" for j in range(k))
        src = f"def fused(out, {args}, a):\n    for i in numba.prange(out.shape[0]):\n        out[i] = {terms}\n"
        namespace: dict = {"numba": numba}
        exec(src, namespace)  # noqa: S102 - generated from integers only
        _KERNELS[k] = numba.njit(parallel=True, fastmath=False, nogil=True)(namespace["fused"])
    return _KERNELS[k]


def weighted_sum_into(out: torch.Tensor, tensors: torch.Tensor | Sequence[torch.Tensor],
                      alpha: Sequence[float]) -> None:
    """out = sum_j alpha_j * tensors[j], in place: one multiply, then fused adds."""
    first = tensors[0]
    if first.dtype == out.dtype:
        torch.mul(first, alpha[0], out=out)
    else:  # a bf16 memory-mapped basis member into an fp32 model
        out.copy_(first).mul_(alpha[0])
    for t, a in zip(tensors[1:], alpha[1:]):
        if a != 0.0:
            out.add_(t, alpha=a)


def masked_sum_into(out: torch.Tensor, dense: Sequence[torch.Tensor], bits: Sequence[torch.Tensor],
                    a: Sequence[float], s: Sequence[float], compiled: bool = True) -> None:
    """out = sum_j a_j D_j + sum_i s_i m_i (D_{1+i} - D_0), in place, computed in fp32.

    ``dense``: D_0 the base, D_1..D_N the experts, then any extra members, each in its stored
    dtype; ``bits``: the N experts' packed DARE keep-masks m_i; ``a``: one coefficient per dense
    member; ``s``: one per mask. The DARE term is written as a masked task vector rather than
    as (a_0 - m s) D_0 + (a_i + m s) D_i so that large coefficients do not cancel.
    ``compiled=False`` forces the torch path (the one a GPU takes).
    """
    if compiled and _fused_masked(out, dense, bits, a, s):
        return
    if out.is_contiguous():
        _chunked_masked_sum_into(out.view(-1), dense, bits, a, s)
    else:
        scratch = torch.empty(out.shape, dtype=out.dtype, device=out.device)
        _chunked_masked_sum_into(scratch.view(-1), dense, bits, a, s)
        out.copy_(scratch)


CHUNK_ENTRIES = 1 << 24  # entries per torch step: bounds the temporaries (64 MiB each in fp32)


def _chunked_masked_sum_into(flat: torch.Tensor, dense: Sequence[torch.Tensor], bits: Sequence[torch.Tensor],
                             a: Sequence[float], s: Sequence[float]) -> None:
    """The compiled kernel's sum, operation for operation: every product rounded to fp32 on
    its own, then added in the kernel's order, zero coefficients included (they can flip the
    sign of a zero). No fused multiply-add (``add_(alpha=)`` is one on CPU and GPU), so this
    path gives the kernel's bits on any device: a particle summed on the GPU, or in the vLLM
    engine's process, is the one the host would have written."""
    a = [float(np.float32(c)) for c in a]  # the kernel's fp32 coefficients
    s = [float(np.float32(c)) for c in s]
    n = flat.numel()
    term = torch.empty(min(n, CHUNK_ENTRIES), dtype=torch.float32, device=flat.device)
    for lo in range(0, n, CHUNK_ENTRIES):  # a multiple of 8: chunks start on a mask byte
        hi = min(n, lo + CHUNK_ENTRIES)
        # members travel in their stored dtype (a GPU copies half the bytes for bf16), then fp32
        part = [d.reshape(-1)[lo:hi].to(flat.device, non_blocking=True).float() for d in dense]
        acc, t = flat[lo:hi], term[: hi - lo]
        torch.mul(part[0], a[0], out=acc)
        for p, c in zip(part[1:], a[1:]):
            acc.add_(torch.mul(p, c, out=t))
        for i, c in enumerate(s):
            keep = unpack_bits(bits[i][lo // 8: (hi + 7) // 8].to(flat.device, non_blocking=True), hi - lo)
            # (s_i if bit else +0) * (expert - base), as the kernel writes it
            acc.add_(torch.sub(part[1 + i], part[0], out=t).mul_(torch.where(keep, c, 0.0)))


_NUMPY_VIEW = {torch.float32: ("f", lambda t: t.reshape(-1).numpy()),
               torch.bfloat16: ("b", lambda t: t.reshape(-1).view(torch.int16).numpy().view(np.uint16))}


def _fused_masked(out: torch.Tensor, dense: Sequence[torch.Tensor], bits: Sequence[torch.Tensor],
                  a: Sequence[float], s: Sequence[float]) -> bool:
    """The compiled pass; False where it does not apply (no numba, not a CPU fp32 target,
    a member neither fp32 nor bf16, or not contiguous)."""
    if out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous():
        return False
    if any(d.device.type != "cpu" or d.dtype not in _NUMPY_VIEW or not d.is_contiguous() for d in dense):
        return False
    codes = "".join(_NUMPY_VIEW[d.dtype][0] for d in dense)
    kernel = _masked_kernel(codes, len(bits))
    if kernel is None:
        return False
    arrays = [_NUMPY_VIEW[d.dtype][1](d) for d in dense] + [b.cpu().numpy() for b in bits]
    with _KERNEL_LOCK:
        kernel(out.view(-1).numpy(), *arrays, np.asarray(a, dtype=np.float32), np.asarray(s, dtype=np.float32))
    return True


_MASKED_KERNELS: dict[tuple[str, int], object] = {}


def _masked_kernel(codes: str, n_masks: int):
    """A numba kernel for dense members of the given dtypes (``f`` fp32, ``b`` bf16 read as
    uint16) and ``n_masks`` masks over members 1..n_masks, generated once per signature.

    The main loop takes 64 entries at a time: each mask's 8 bytes for them become one 64-bit
    word, and the inner loop of 64 tests bit j of that word, which LLVM vectorises (a loop over
    single bytes does not). Indices are unsigned so that numba emits no negative-index
    wraparound, which would also stop vectorisation. The last ``n % 64`` entries are a tail."""
    key = (codes, n_masks)
    if key not in _MASKED_KERNELS:
        numba = _numba()
        if numba is None:
            _MASKED_KERNELS[key] = None
            return None
        dense = [f"d{j}" for j in range(len(codes))]
        masks = [f"m{i}" for i in range(n_masks)]

        def body(indent: str, bit: str) -> list[str]:
            loads = [f"{indent}x{j} = " + (f"bf16(d{j}[e])" if c == "b" else f"d{j}[e]") for j, c in enumerate(codes)]
            total = " + ".join(f"a[{j}] * x{j}" for j in range(len(codes)))
            terms = [f"{indent}acc += (s[{i}] if {bit.format(i=i)} else zero) * (x{1 + i} - x0)"
                     for i in range(n_masks)]
            return [*loads, f"{indent}acc = {total}", *terms, f"{indent}out[e] = acc"]

        def word(i: int) -> str:  # the 8 mask bytes of a 64-entry block, little-endian
            return " | ".join(f"(u64(m{i}[q + u64({b})]) << u64({8 * b}))" for b in range(8))

        src = "\n".join([
            f"def fused(out, {', '.join(dense + masks)}, a, s):",
            "    n = u64(out.shape[0])",
            "    blocks = n >> u64(6)",
            "    zero = np.float32(0.0)",
            "    for w in numba.prange(blocks):",
            "        q = w * u64(8)",
            *[f"        c{i} = {word(i)}" for i in range(n_masks)],
            "        first = w * u64(64)",
            "        for j in range(u64(64)):",
            "            e = first + j",
            *body(" " * 12, "(c{i} >> j) & u64(1)"),
            "    for e in range(blocks * u64(64), n):",
            *body(" " * 8, "(m{i}[e >> u64(3)] >> (e & u64(7))) & u64(1)"),
        ]) + "\n"
        namespace: dict = {"numba": numba, "np": np, "u64": np.uint64, "bf16": _bf16_to_f32()}
        exec(src, namespace)  # noqa: S102 - generated from integers and fixed codes only
        _MASKED_KERNELS[key] = numba.njit(parallel=True, fastmath=False, nogil=True)(namespace["fused"])
    return _MASKED_KERNELS[key]


_BF16: list = []


def _bf16_to_f32():
    """A numba intrinsic widening bf16 bits (uint16) to the fp32 they stand for: shift them into
    the high half of a 32-bit word and reinterpret it, exact and vectorisable."""
    if not _BF16:
        from llvmlite import ir
        from numba import types
        from numba.extending import intrinsic

        @intrinsic
        def bf16_to_f32(typingctx, bits):
            if bits != types.uint16:
                return None

            def codegen(context, builder, signature, args):
                word = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
                return builder.bitcast(word, ir.FloatType())

            return types.float32(types.uint16), codegen

        _BF16.append(bf16_to_f32)
    return _BF16[0]
