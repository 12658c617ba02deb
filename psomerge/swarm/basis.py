"""The swarm's basis: base, N experts, N DARE-sparsified experts and E extra members
(K = 2N + 1 + E models, coefficients in that order).

A DARE member is ``theta0 + m * (theta_i - theta0) / (1 - p)``: the basis keeps its keep-mask
``m`` (one bit per parameter, drawn once, seeded, cached on disk; ``swarm.masks``), never a
dense copy. A particle is a (G, K) coefficient matrix; it is materialised into one resident
model in place, tensor by tensor, reading base, experts, extras and masks once:
with ``b_i`` the DARE coefficients and ``s_i = b_i / (1 - p)``,
``param = (alpha_0 + sum_i b_i) theta0 + sum_i alpha_i theta_i + sum_i s_i m_i (theta_i - theta0)
+ sum_e x_e extra_e``, with no second model allocated.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from psomerge.errors import CheckpointError, ConfigError
from psomerge.hashing import digest
from psomerge.io import Checkpoint, Model, check_compatible, model_labels, open_model, write_checkpoint
from psomerge.io.checkpoint import tensor_spans
from psomerge.io.vocab import AlignedModel, TokenizerSource, align_vocabularies
from psomerge.progress import SILENT, Progress
from psomerge.swarm.masks import DareMask, dare_masks_for, unpack_bits
from psomerge.swarm.materialise import fused_sum_into, masked_sum_into, weighted_sum_into, writable_tensors
from psomerge.yamlconfig import StrictModel

log = logging.getLogger(__name__)

Granularity = Literal["model", "layer", "tensor"]
Storage = Literal["ram", "cuda", "pinned", "mmap", "ram_dense", "compact"]
# the mask layout's storages: base, experts and extras dense, DARE members as packed keep-bits,
# summed by one kernel whose bits every one of them (and a vLLM engine's process) reproduces
MASK_STORAGES = ("ram", "cuda", "pinned", "mmap")
_LAYER = re.compile(r"\.layers?\.(\d+)\.|\.h\.(\d+)\.|\.blocks?\.(\d+)\.")


COEFFICIENTS_FILE = "psomerge_coefficients.json"  # beside a merged model: basis, groups, coefficients


class BasisSettings(StrictModel):
    """The swarm's basis (``basis:`` in a run config)."""

    drop_rate: float = Field(0.8, ge=0, lt=1)  # DARE p; survivors rescaled by 1 / (1 - p)
    seed: int = 0
    granularity: Granularity = "model"  # one coefficient vector per model, layer or tensor
    storage: Storage = "ram"
    # experts whose tokenizers differ from the base's: one vocabulary for the basis, the
    # merged model and its tokenizer (mergekit's tokenizer_source); None: a mismatch is an error
    tokenizer_source: TokenizerSource | None = None

    @property
    def sums_like_masks(self) -> bool:
        """Whether ``storage`` is a mask layout (``MASK_STORAGES``), whose sum a vLLM engine's
        process reproduces bit for bit (``Basis.sums_like_masks``)."""
        return self.storage in MASK_STORAGES

    @property
    def resident_device(self) -> str:
        """Where particles are summed (and a transformers resident model lives)."""
        return "cuda" if self.storage in ("cuda", "pinned") else "cpu"


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


def floating_names(ckpt: Model) -> list[str]:
    """The tensors a particle mixes: the floating-point ones (integer buffers are copied)."""
    return [n for n in ckpt.tensor_names if ckpt.info(n).dtype.is_floating_point]


def dare_tensor(base: torch.Tensor, expert: torch.Tensor, bits: torch.Tensor, keep: float) -> torch.Tensor:
    """A DARE member's tensor in fp32: base + m (expert - base) / keep, as ``merging.sparsify.dare``
    computes it (default rescale), with m the unpacked ``bits``."""
    base = base.float()
    delta = expert.float() - base
    mask = unpack_bits(bits, delta.numel()).reshape(delta.shape)
    return base + (delta * mask) / keep


class DareMember:
    """A DARE member read like a checkpoint: ``get(name)`` is base + m (expert - base) / (1 - p)
    in fp32 (``merging.sparsify.dare`` with its default rescale), computed from the two models
    and the mask when asked. The dense layouts and reference computations read it; the default
    layout never does."""

    def __init__(self, base: Model, expert: Model, mask: DareMask):
        self.base, self.expert, self.mask = base, expert, mask
        self.name = mask.name

    @property
    def tensor_names(self) -> list[str]:
        return self.base.tensor_names

    def info(self, name: str):
        return self.base.info(name)

    def get(self, name: str) -> torch.Tensor:
        return dare_tensor(self.base.get(name), self.expert.get(name), self.mask.bits(name), self.mask.keep)

    def weight_files(self) -> list[Path]:
        return [*self.expert.weight_files(), *self.mask.weight_files()]

    def close(self) -> None:
        self.base.close()
        self.expert.close()
        self.mask.close()


class Basis:
    """Base, N experts, N DARE members (as masks) and E extra members sharing names and shapes.

    ``members`` lists all K in coefficient order (``labels`` name them); the DARE ones are
    ``DareMember`` views. ``storage`` picks the layout:

    - ``ram`` (default) / ``cuda`` / ``pinned``: base, experts and extras held in their stored
      dtype (bf16 stays bf16) and the masks as packed bits, 1 bit per parameter per expert:
      N + 1 + E model copies instead of K. ``ram`` sums on the CPU in one compiled pass;
      ``cuda`` holds everything on the GPU; ``pinned`` holds it in page-locked host memory and
      sums each tensor on the GPU (members too large for it beside the resident model).
    - ``mmap``: nothing held; members and masks are read from their memory-mapped files on
      every materialisation (for a basis larger than RAM).
    - ``ram_dense``: the former layout, all K members dense in fp32 (DARE members expanded).
    - ``compact``: base, experts and extras dense in fp32, each DARE member as the indices
      and values of its surviving delta entries.

    Every layout computes in fp32 and gives the same particle to fp32 rounding; which one
    made a basis is part of its fingerprint (cached scores are per layout). The mask layouts
    (``ram``, ``cuda``, ``pinned``, ``mmap``) give the same bits as one another. A held layout
    reads its members on the first particle, not before: a run whose particles are summed in
    another process (a vLLM engine's, ``spec``) never holds them here.
    """

    def __init__(self, checkpoints: Sequence[Model], masks: Sequence[DareMask], labels: Sequence[str],
                 fingerprint: str, granularity: Granularity = "model", storage: Storage = "ram",
                 model_dir: Path | None = None):
        n = len(masks)
        if n < 1 or len(checkpoints) < 1 + n:
            raise ValueError("a basis is base + N experts (N >= 1) with their N DARE masks, then extras")
        self.checkpoints = list(checkpoints)  # the dense members: base, experts, extras
        self.masks = list(masks)
        self.n_experts = n
        self.n_extras = len(checkpoints) - 1 - n
        base = self.checkpoints[0]
        dare = [DareMember(base, e, m) for e, m in zip(self.checkpoints[1: 1 + n], self.masks)]
        self.members = [*self.checkpoints[: 1 + n], *dare, *self.checkpoints[1 + n:]]
        # a folder with the basis's config, tokenizer and vocabulary, for resident models
        self.model_dir = Path(model_dir or base.path)
        self.labels = list(labels)
        if len(self.labels) != len(self.members):
            raise ValueError(f"{len(self.labels)} labels for {len(self.members)} basis members")
        self.fingerprint = fingerprint
        self.names = floating_names(base)
        self.group_labels, self.group_of = tensor_groups(self.names, granularity)
        self.granularity = granularity
        self.storage = storage
        self.spec: dict | None = None  # how another process opens this basis (``from_spec``), set by build_basis
        if storage == "ram_dense":
            self._layout: _Layout = _DenseLayout(self)
        elif storage == "compact":
            self._layout = _CompactLayout(self)
        elif storage in MASK_STORAGES:
            self._layout = _MaskedLayout(self, storage)
        else:
            raise ConfigError(f"basis.storage {storage!r} is not one of ram, cuda, pinned, mmap, ram_dense, compact")

    @classmethod
    def from_spec(cls, spec: dict, storage: Storage) -> "Basis":
        """The basis ``spec`` describes (``Basis.spec`` of one built by ``build_basis``, e.g. in
        another process), its masks as written, held in ``storage``."""
        base, experts, extras = open_members(spec["base"], spec["experts"], spec["extras"], spec["tokenizer_source"])
        masks = [DareMask(folder, drop_rate, name) for folder, drop_rate, name in spec["masks"]]
        shapes = {n: base.info(n).shape for n in floating_names(base)}
        for mask in masks:
            mask.check(shapes)
        basis = cls([base, *experts, *extras], masks, spec["labels"], spec["fingerprint"], spec["granularity"],
                    storage, model_dir=Path(spec["model_dir"]))
        basis.spec = spec
        return basis

    def with_storage(self, storage: Storage) -> "Basis":
        """The same members and masks, held in ``storage``."""
        other = Basis(self.checkpoints, self.masks, self.labels, self.fingerprint, self.granularity, storage,
                      model_dir=self.model_dir)
        other.spec = self.spec
        return other

    @property
    def sums_like_masks(self) -> bool:
        """Whether particles are summed by the mask layout's kernel (``ram``, ``cuda``,
        ``pinned``, ``mmap``), whose bits another process holding the same basis reproduces."""
        return isinstance(self._layout, _MaskedLayout)

    @property
    def k(self) -> int:
        return len(self.members)

    @property
    def num_groups(self) -> int:
        return len(self.group_labels)

    def nbytes(self) -> int:
        """Bytes the layout holds in memory (0 for ``mmap``)."""
        return self._layout.nbytes()

    def mask_coefficients(self, alpha: Sequence[float]) -> tuple[list[float], list[float]]:
        """(a, s): one coefficient per dense member (base, experts, extras) and one per mask,
        so that sum_j alpha_j B_j = sum_j a_j D_j + sum_i s_i m_i (expert_i - base)."""
        n = self.n_experts
        dare = list(alpha[1 + n: 1 + 2 * n])
        a = [alpha[0] + sum(dare), *alpha[1: 1 + n], *alpha[1 + 2 * n:]]
        return a, [b / m.keep for b, m in zip(dare, self.masks)]

    def combine_into(self, out: torch.Tensor, name: str, alpha: Sequence[float]) -> None:
        """out = sum_j alpha_j * B_j for tensor ``name`` (fp32), in place, no model-sized temporaries."""
        self._layout.combine_into(out, name, alpha)

    def write_particle(self, coeffs: np.ndarray, out_dir: str | Path) -> Path:
        """Stream the particle to a checkpoint folder with the base's config and tokenizer,
        and its coefficients beside it."""
        ref = self.checkpoints[0]
        coeffs = np.asarray(coeffs, dtype=np.float64)

        def tensor(name: str) -> torch.Tensor | None:
            if name not in self.group_of:
                return None
            out = torch.empty(ref.info(name).shape, dtype=torch.float32)
            self.combine_into(out, name, coeffs[self.group_of[name]].tolist())
            return out

        coefficients = json.dumps({"basis": self.labels, "groups": self.group_labels, "coefficients": coeffs.tolist(),
                                   "basis_fingerprint": self.fingerprint}, indent=2)
        return write_checkpoint(out_dir, ref, tensor, inputs=self.checkpoints[1:],
                                extra_files={COEFFICIENTS_FILE: coefficients})

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
        self._layout.hold()
        tensors = writable_tensors(target, self.names)
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


# -- layouts: what is held, and how one tensor of a particle is summed ------------------------

class _Layout:
    def hold(self) -> None:
        """Read what the layout holds, if not yet done (before a particle is materialised)."""

    def nbytes(self) -> int:
        raise NotImplementedError

    def combine_into(self, out: torch.Tensor, name: str, alpha: Sequence[float]) -> None:
        raise NotImplementedError


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _MaskedLayout(_Layout):
    """Dense members in their stored dtype and packed masks: held (``ram``, ``cuda``,
    ``pinned``) or read from the memory-mapped files per particle (``mmap``)."""

    def __init__(self, basis: Basis, storage: Storage):
        self.basis = basis
        self.storage = storage
        self.dense: dict[str, list[torch.Tensor]] = {}
        self.bits: dict[str, list[torch.Tensor]] = {}
        if storage == "pinned" and not torch.cuda.is_available():
            raise ConfigError("basis.storage 'pinned' keeps members in page-locked memory for a GPU, "
                              "and no CUDA device is available; use ram")
        self._held = threading.Event()
        self._lock = threading.Lock()

    def hold(self) -> None:
        if self.storage == "mmap" or self._held.is_set():
            return
        with self._lock:  # residents of several threads: one reads, the others wait for it
            if not self._held.is_set():
                self._load(torch.device("cuda" if self.storage == "cuda" else "cpu"), pin=self.storage == "pinned")
                self._held.set()

    def _load(self, device: torch.device, pin: bool) -> None:
        """Member after member, closing each. On the host, tensors are read with plain file
        reads into their place, so no page of a member file is mapped while the copy fills."""
        names = self.basis.names
        for ckpt in self.basis.checkpoints:
            spans: dict[Path, dict[str, tuple[int, int]]] = {}
            for name in names:
                info = ckpt.info(name)
                if device.type == "cpu":
                    held = torch.empty(info.shape, dtype=info.dtype, pin_memory=pin)
                    _read_into(ckpt, name, held, spans)
                else:
                    held = ckpt.get(name).to(device)
                self.dense.setdefault(name, []).append(held)
            ckpt.close()
        for mask in self.basis.masks:
            for name in names:
                self.bits.setdefault(name, []).append(
                    mask.bits(name).to(device) if device.type != "cpu" else
                    torch.empty(mask.nbytes(name), dtype=torch.uint8, pin_memory=pin).copy_(mask.bits(name)))
            mask.close()

    def nbytes(self) -> int:
        self.hold()
        return sum(_nbytes(ts) for ts in self.dense.values()) + sum(_nbytes(ts) for ts in self.bits.values())

    def combine_into(self, out: torch.Tensor, name: str, alpha: Sequence[float]) -> None:
        a, s = self.basis.mask_coefficients(alpha)
        if self._held.is_set():  # else from the files (mmap, or a merge written before any particle): same bits
            masked_sum_into(out, self.dense[name], self.bits[name], a, s)
        else:
            masked_sum_into(out, [c.get(name) for c in self.basis.checkpoints],
                            [m.bits(name) for m in self.basis.masks], a, s)


class _DenseLayout(_Layout):
    """All K members stacked dense in fp32 (K x 4 bytes per parameter)."""

    def __init__(self, basis: Basis):
        ref, n = basis.checkpoints[0], basis.n_experts
        self.stacked = {name: torch.empty((basis.k, *ref.info(name).shape), dtype=torch.float32)
                        for name in basis.names}
        dense_rows = [*range(1 + n), *range(1 + 2 * n, basis.k)]  # base, experts, extras
        for j, ckpt in zip(dense_rows, basis.checkpoints):
            for name in basis.names:
                self.stacked[name][j].copy_(ckpt.get(name))
            ckpt.close()
        for i, mask in enumerate(basis.masks):  # DARE rows from the rows already held: no file mapped again
            for name in basis.names:
                rows = self.stacked[name]
                rows[1 + n + i].copy_(dare_tensor(rows[0], rows[1 + i], mask.bits(name), mask.keep))
            mask.close()

    def nbytes(self) -> int:
        return _nbytes(self.stacked.values())

    def combine_into(self, out: torch.Tensor, name: str, alpha: Sequence[float]) -> None:
        if not fused_sum_into(out, self.stacked[name], alpha):
            weighted_sum_into(out, self.stacked[name], alpha)


class _CompactLayout(_Layout):
    """Base, experts and extras dense in fp32, each DARE member as (index, value) of its
    surviving entries minus the base (int32 index + fp32 value where indices fit)."""

    def __init__(self, basis: Basis):
        self.basis = basis
        ref = basis.checkpoints[0]
        dense = basis.checkpoints
        self.dense = {n: torch.empty((len(dense), *ref.info(n).shape), dtype=torch.float32) for n in basis.names}
        for j, ckpt in enumerate(dense):
            for name in basis.names:
                self.dense[name][j].copy_(ckpt.get(name))
            ckpt.close()
        self.sparse: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for i, mask in enumerate(basis.masks):
            for name in basis.names:
                rows = self.dense[name]
                member = dare_tensor(rows[0], rows[1 + i], mask.bits(name), mask.keep)
                self.sparse.setdefault(name, []).append(_sparse_delta(member, rows[0]))
            mask.close()

    def nbytes(self) -> int:
        return _nbytes(self.dense.values()) + sum(_nbytes(pair) for pairs in self.sparse.values() for pair in pairs)

    def combine_into(self, out: torch.Tensor, name: str, alpha: Sequence[float]) -> None:
        n = self.basis.n_experts
        a, _ = self.basis.mask_coefficients(alpha)  # base + sum of DARE coefficients, experts, extras
        weighted_sum_into(out, self.dense[name], a)
        flat = out.view(-1)
        for (index, value), b in zip(self.sparse[name], alpha[1 + n: 1 + 2 * n]):
            if b != 0.0:
                flat.index_add_(0, index, value, alpha=b)


def _sparse_delta(member: torch.Tensor, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (int32 where they fit) and values of member - base where it is non-zero."""
    delta = (member - base).reshape(-1)
    index = torch.nonzero(delta).reshape(-1)
    value = delta[index]
    if delta.numel() < 2**31:
        index = index.to(torch.int32)
    return index, value


def _read_into(ckpt: Model, name: str, out: torch.Tensor, spans: dict[Path, dict[str, tuple[int, int]]]) -> None:
    """Tensor ``name`` of ``ckpt`` read into ``out`` (host memory, its stored dtype). A plain
    safetensors checkpoint is read with file reads at the tensor's offset (``spans`` caches
    the headers); other models (``.bin`` files, LoRA experts, vocabulary-aligned views) are
    copied from what ``get`` returns."""
    if not isinstance(ckpt, Checkpoint) or ckpt.format != "safetensors":
        out.copy_(ckpt.get(name))
        return
    path = ckpt.path / ckpt.info(name).file
    if path not in spans:
        spans[path] = tensor_spans(path)
    begin, end = spans[path][name]
    view = out.reshape(-1).view(torch.uint8).numpy()
    with open(path, "rb") as f:
        f.seek(begin)
        if end - begin != view.nbytes or f.readinto(view) != view.nbytes:
            raise CheckpointError(f"model {ckpt.name!r}: tensor {name!r} in {path} is truncated or not "
                                  f"{list(out.shape)} {out.dtype}")


def member_coefficients(k: int, groups: int, j: int) -> np.ndarray:
    """The (G, K) particle that is basis member j itself (one-hot in every group)."""
    coeffs = np.zeros((groups, k))
    coeffs[:, j] = 1.0
    return coeffs


def build_basis(
    base: str | Path,
    experts: Sequence[str | Path],
    cache_dir: str | Path,
    settings: BasisSettings = BasisSettings(),
    extra_members: Sequence[tuple[str, str | Path]] = (),
    progress: Progress = SILENT,
) -> Basis:
    """Open base, experts and ``extra_members`` ((label, checkpoint folder) pairs, e.g.
    ("merge:ties", path), held like experts), write (or reuse) the experts' DARE masks,
    return the basis. Coefficients index [base, experts..., dare..., extras...]."""
    base_ck, expert_cks, extra_cks = open_members(base, experts, extra_members, settings.tokenizer_source)
    names = model_labels(experts)  # distinct even where two expert folders share a name
    labels = (["base"] + [f"expert:{n}" for n in names] + [f"dare:{n}" for n in names]
              + [label for label, _ in extra_members])
    for label, _ in extra_members:
        if labels.count(label) > 1:
            raise ConfigError(f"basis member label {label!r} is used twice; extra members need distinct labels")
    check_compatible(base_ck, expert_cks + extra_cks)
    fps = [c.fingerprint() for c in (base_ck, *expert_cks, *extra_cks)]
    model_dir = None
    if isinstance(base_ck, AlignedModel):  # resident models load the base with the shared vocabulary
        model_dir = Path(cache_dir) / f"base-{digest([fps[: 1 + len(experts)], settings.tokenizer_source], 12)}"
        if not (model_dir / "config.json").exists():
            write_checkpoint(model_dir, base_ck, lambda name: None, inputs=expert_cks)  # private if any is
    names = floating_names(base_ck)
    masks = []
    for i, expert in enumerate(expert_cks):
        task = progress.start(f"DARE masks of {expert.name} (p={settings.drop_rate})", len(names))
        try:
            masks.append(dare_masks_for(cache_dir, expert, names, fps[0], fps[1 + i], settings.drop_rate,
                                        settings.seed, on_tensor=lambda _: task.advance()))
        finally:
            task.close()
    fingerprint = digest({"members": fps, "experts": len(expert_cks), "drop_rate": settings.drop_rate,
                          "seed": settings.seed, "tokenizer_source": settings.tokenizer_source, "dare": "mask",
                          "layout": settings.storage}, 12)
    basis = Basis([base_ck, *expert_cks, *extra_cks], masks, labels, fingerprint, settings.granularity,
                  settings.storage, model_dir=model_dir)
    basis.spec = {"base": str(base), "experts": [str(e) for e in experts],
                  "extras": [[label, str(path)] for label, path in extra_members],
                  "tokenizer_source": settings.tokenizer_source, "granularity": settings.granularity,
                  "masks": [[str(m.folder), m.drop_rate, m.name] for m in masks], "labels": labels,
                  "fingerprint": fingerprint, "model_dir": str(basis.model_dir)}
    return basis


def open_members(base: str | Path, experts: Sequence[str | Path], extra_members: Sequence[Sequence],
                 tokenizer_source: TokenizerSource | None) -> tuple[Model, list[Model], list[Checkpoint]]:
    """Base, experts (checkpoint folders or adapters of the base) in one vocabulary, and the
    extra members ((label, checkpoint folder) pairs), opened as the basis reads them."""
    base_ck = open_model(base, name=str(base))
    expert_cks = [open_model(e, name=str(e), base=base_ck) for e in experts]
    base_ck, expert_cks = align_vocabularies(base_ck, expert_cks, tokenizer_source)
    return base_ck, expert_cks, [Checkpoint(path, name=label) for label, path in extra_members]
