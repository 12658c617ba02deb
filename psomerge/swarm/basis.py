"""The swarm's basis: base, experts and DARE-sparsified experts (K = 2N+1 models).

DARE experts are written to disk once (seeded masks, streamed tensor by tensor) and reused
when the inputs and settings match. A particle is a (G, K) coefficient matrix; it is
materialised into one resident model in place, tensor by tensor:
``param = sum_j alpha[g, j] * B_j``, with no second model allocated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from psomerge.errors import ConfigError
from psomerge.io import Checkpoint, StreamingSafetensorsWriter, check_compatible, check_finite, copy_model_files
from psomerge.merging.sparsify import dare
from psomerge.merging.task_vectors import generator, task_vector

log = logging.getLogger(__name__)

Granularity = Literal["model", "layer", "tensor"]
Storage = Literal["ram", "compact", "mmap", "cuda"]
_LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.blocks?\.(\d+)\.")


@dataclass(frozen=True)
class BasisSpec:
    drop_rate: float = 0.8  # DARE p; survivors rescaled by 1 / (1 - p)
    seed: int = 0
    granularity: Granularity = "model"


def tensor_groups(names: Sequence[str], granularity: Granularity) -> tuple[list[str], dict[str, int]]:
    """Group labels and each tensor's group index.

    ``layer``: one group per transformer block, plus one for the tensors before the first
    block (embeddings) and one for those after it (final norm, LM head).
    """
    if granularity == "model":
        return ["all"], {n: 0 for n in names}
    if granularity == "tensor":
        return list(names), {n: i for i, n in enumerate(names)}
    if granularity != "layer":
        raise ConfigError(f"granularity {granularity!r} is not one of model, layer, tensor")
    labels: list[str] = []
    index: dict[str, int] = {}
    seen_layer = False
    for n in names:
        m = _LAYER.search(n)
        if m:
            label = f"layer{next(g for g in m.groups() if g is not None)}"
            seen_layer = True
        else:
            label = "head" if seen_layer else "embed"
        if label not in labels:
            labels.append(label)
        index[n] = labels.index(label)
    return labels, index


class Basis:
    """K = 2N+1 checkpoints sharing names and shapes: base, N experts, N DARE experts.

    ``storage``:
    - ``ram`` / ``cuda``: all K members held dense in fp32 (K x 4 bytes per parameter);
      materialisation is K fused in-place multiply-adds, the fastest layout.
    - ``compact``: base and experts dense, each DARE expert as the indices and values of its
      surviving delta entries (at p = 0.8, a fifth of the entries: int32 index + fp32 value =
      1.6 bytes per parameter instead of 4). Less memory, slower scatter-adds.
    - ``mmap``: nothing held; tensors are read from the memory-mapped safetensors files on
      every materialisation (for a basis larger than RAM).
    """

    def __init__(self, members: Sequence[Checkpoint], labels: Sequence[str], fingerprint: str,
                 granularity: Granularity = "model", storage: Storage = "ram"):
        if len(members) % 2 != 1:
            raise ValueError("a basis is base + N experts + N DARE experts")
        self.members = list(members)
        self.labels = list(labels)
        self.fingerprint = fingerprint
        self.n_experts = (len(members) - 1) // 2
        self.names = [n for n in members[0].tensor_names if members[0].info(n).dtype.is_floating_point]
        self.group_labels, self.group_of = tensor_groups(self.names, granularity)
        self.granularity = granularity
        self.storage = storage
        self._dense: dict[str, torch.Tensor] = {}  # name -> (1 + N, *shape): base, experts
        self._sparse: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # name -> N x (index, value)
        if storage != "mmap":
            self._load(torch.device("cuda" if storage == "cuda" else "cpu"), compact=storage == "compact")

    def _load(self, device: torch.device, compact: bool) -> None:
        """Read member after member, closing each, so no more than one model's file pages
        stay mapped while the in-memory copy fills."""
        n = self.n_experts if compact else self.k - 1
        ref = self.members[0]
        for name in self.names:
            self._dense[name] = torch.empty((1 + n, *ref.info(name).shape), dtype=torch.float32, device=device)
        for i, member in enumerate(self.members[: 1 + n]):
            for name in self.names:
                self._dense[name][i].copy_(member.get(name))
            member.close()
        for member in self.members[1 + n :]:
            for name in self.names:
                base = self._dense[name][0]
                self._sparse.setdefault(name, []).append(_sparse_delta(member.get(name).to(base), base))
            member.close()

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def num_groups(self) -> int:
        return len(self.group_labels)

    def nbytes(self) -> int:
        dense = sum(t.numel() * t.element_size() for t in self._dense.values())
        sparse = sum(i.numel() * i.element_size() + v.numel() * v.element_size()
                     for pairs in self._sparse.values() for i, v in pairs)
        return dense + sparse

    def combine_into(self, out: torch.Tensor, name: str, alpha: Sequence[float]) -> None:
        """out = sum_j alpha_j * B_j for tensor ``name``, in place, no temporaries.

        Compact form: with b_i the DARE coefficients and s_i the surviving entries of DARE
        expert i minus the base, sum_j alpha_j B_j = (alpha_0 + sum_i b_i) base
        + sum_i alpha_i expert_i + sum_i b_i scatter(s_i).
        """
        if not self._dense:  # memory-mapped members, moved to the model's device one name at a time
            weighted_sum_into(out, [m.get(name).to(out.device) for m in self.members], alpha)
            return
        if not self._sparse:
            stacked = self._dense[name]
            if not fused_sum_into(out, stacked, alpha):
                weighted_sum_into(out, stacked, alpha)
            return
        n = self.n_experts
        dense_alpha = [alpha[0] + sum(alpha[1 + n :])] + list(alpha[1 : 1 + n])
        weighted_sum_into(out, self._dense[name], dense_alpha)
        flat = out.view(-1)
        for (index, value), b in zip(self._sparse[name], alpha[1 + n :]):
            if b != 0.0:
                flat.index_add_(0, index, value, alpha=b)

    @torch.no_grad()
    def materialise(self, coeffs: np.ndarray, target: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
        """Overwrite ``target``'s weights in place with the particle ``coeffs`` (G x K).

        ``target`` is a model (its parameters are written) or a mapping name -> tensor (e.g.
        the shared weight file a vLLM engine reads). The sum is computed in fp32; a
        lower-precision target receives it rounded once, as a merged checkpoint would be.
        """
        coeffs = np.asarray(coeffs, dtype=np.float64)
        if coeffs.shape != (self.num_groups, self.k):
            raise ValueError(f"coefficients of shape {coeffs.shape}, basis needs {(self.num_groups, self.k)}")
        tensors = writable_tensors(target)
        for name in self.names:
            out = tensors.get(name)
            if out is None:
                continue  # e.g. a buffer, or a tied weight the model does not expose
            alpha = coeffs[self.group_of[name]].tolist()
            if out.dtype == torch.float32:
                self.combine_into(out, name, alpha)
            else:
                scratch = torch.empty(out.shape, dtype=torch.float32, device=out.device)
                self.combine_into(scratch, name, alpha)
                out.copy_(scratch)


def writable_tensors(target: torch.nn.Module | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """Name -> tensor to write into: a model's parameters (tied ones under every name), or
    the mapping itself."""
    if isinstance(target, torch.nn.Module):
        return {n: p.data for n, p in target.named_parameters(remove_duplicate=False)}
    return target


def member_coefficients(k: int, groups: int, j: int) -> np.ndarray:
    """The (G, K) particle that is basis member j itself (one-hot in every group)."""
    coeffs = np.zeros((groups, k))
    coeffs[:, j] = 1.0
    return coeffs


def _sparse_delta(member: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int32 where they fit) and values of member - base where it is non-zero."""
    delta = (member - base).reshape(-1)
    index = torch.nonzero(delta).reshape(-1)
    value = delta[index]
    if delta.numel() < 2**31:
        index = index.to(torch.int32)
    return index, value


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


def build_basis(
    base: str | Path,
    experts: Sequence[str | Path],
    cache_dir: str | Path,
    spec: BasisSpec = BasisSpec(),
    storage: Storage = "ram",
) -> Basis:
    """Open base and experts, write (or reuse) their DARE versions, return the basis."""
    base_ck = Checkpoint(base, name=str(base))
    expert_cks = [Checkpoint(e, name=str(e)) for e in experts]
    check_compatible(base_ck, expert_cks)
    fps = [base_ck.fingerprint()] + [e.fingerprint() for e in expert_cks]
    key = hashlib.blake2b(json.dumps([fps, spec.drop_rate, spec.seed]).encode(), digest_size=12).hexdigest()
    root = Path(cache_dir) / key
    dare_paths = [root / f"dare{i}" for i in range(len(experts))]
    if not all((p / "config.json").exists() for p in dare_paths):
        log.info("writing %d DARE experts (p=%.2f) to %s", len(experts), spec.drop_rate, root)
        for i, (expert, path) in enumerate(zip(expert_cks, dare_paths)):
            _write_dare_expert(base_ck, expert, path, spec, tag=fps[i + 1])
    dare_cks = [Checkpoint(p, name=f"dare({expert_cks[i].name})") for i, p in enumerate(dare_paths)]
    labels = ["base"] + [f"expert:{Path(e).name}" for e in experts] + [f"dare:{Path(e).name}" for e in experts]
    return Basis([base_ck, *expert_cks, *dare_cks], labels, key, spec.granularity, storage)


def _write_dare_expert(base: Checkpoint, expert: Checkpoint, out: Path, spec: BasisSpec, tag: str) -> None:
    plan = [(n, base.info(n).shape, base.info(n).dtype) for n in base.tensor_names]
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted build
    with StreamingSafetensorsWriter(partial, plan) as writer:
        for name in base.tensor_names:
            b, e = base.get(name), expert.get(name)
            if not b.is_floating_point():
                writer.write(name, b)
                continue
            check_finite(e, expert.name, name)
            delta = dare(task_vector(e, b), spec.drop_rate, generator(spec.seed, tag, name))
            writer.write(name, (b.float() + delta).to(b.dtype))
    copy_model_files(base.path, partial, base.dtype)
    partial.rename(out)
