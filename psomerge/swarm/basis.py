"""The swarm's basis: base, experts and DARE-sparsified experts (K = 2N+1 models).

DARE experts are written to disk once (seeded masks, streamed tensor by tensor) and reused
when the inputs and settings match. A particle is a (G, K) coefficient matrix; it is
materialised into one resident model in place, tensor by tensor:
``param = sum_j alpha[g, j] * B_j``, with no second model allocated.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from psomerge.errors import ConfigError
from psomerge.hashing import digest
from psomerge.io import Checkpoint, Model, check_compatible, check_finite, model_labels, open_model, write_checkpoint
from psomerge.io.vocab import AlignedModel, TokenizerSource, align_vocabularies
from psomerge.merging.sparsify import dare
from psomerge.merging.task_vectors import generator, task_vector
from psomerge.progress import SILENT, Progress
from psomerge.swarm.materialise import fused_sum_into, weighted_sum_into, writable_tensors
from psomerge.yamlconfig import StrictModel

log = logging.getLogger(__name__)

Granularity = Literal["model", "layer", "tensor"]
Storage = Literal["ram", "compact", "mmap", "cuda"]
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

    def __init__(self, members: Sequence[Model], labels: Sequence[str], fingerprint: str,
                 granularity: Granularity = "model", storage: Storage = "ram", n_experts: int | None = None,
                 model_dir: Path | None = None):
        if n_experts is None:
            if len(members) % 2 != 1:
                raise ValueError("a basis is base + N experts + N DARE experts (+ extra members)")
            n_experts = (len(members) - 1) // 2
        self.members = list(members)
        # a folder with the basis's config, tokenizer and vocabulary, for resident models
        self.model_dir = Path(model_dir or members[0].path)
        self.labels = list(labels)
        self.fingerprint = fingerprint
        self.n_experts = n_experts
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

    def write_particle(self, coeffs: np.ndarray, out_dir: str | Path) -> Path:
        """Stream the particle to a checkpoint folder with the base's config and tokenizer,
        and its coefficients beside it."""
        ref = self.members[0]
        coeffs = np.asarray(coeffs, dtype=np.float64)

        def tensor(name: str) -> torch.Tensor | None:
            if name not in self.group_of:
                return None
            out = torch.empty(ref.info(name).shape, dtype=torch.float32)
            self.combine_into(out, name, coeffs[self.group_of[name]].tolist())
            return out

        coefficients = json.dumps({"basis": self.labels, "groups": self.group_labels, "coefficients": coeffs.tolist(),
                                   "basis_fingerprint": self.fingerprint}, indent=2)
        return write_checkpoint(out_dir, ref, tensor, inputs=self.members[1:],
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


def build_basis(
    base: str | Path,
    experts: Sequence[str | Path],
    cache_dir: str | Path,
    settings: BasisSettings = BasisSettings(),
    extra_members: Sequence[tuple[str, str | Path]] = (),
    progress: Progress = SILENT,
) -> Basis:
    """Open base and experts, write (or reuse) their DARE versions, return the basis.
    ``extra_members`` (label, folder), e.g. static merges, follow the DARE members."""
    base_ck = open_model(base, name=str(base))
    expert_cks = [open_model(e, name=str(e), base=base_ck) for e in experts]
    base_ck, expert_cks = align_vocabularies(base_ck, expert_cks, settings.tokenizer_source)
    extra_cks = [Checkpoint(p, name=label) for label, p in extra_members]
    check_compatible(base_ck, expert_cks + extra_cks)
    fps = [base_ck.fingerprint()] + [e.fingerprint() for e in expert_cks]
    dare_key = digest([fps, settings.drop_rate, settings.seed], 12)
    key = dare_key if not extra_cks else digest([dare_key, [[label, c.fingerprint()] for (label, _), c in
                                                            zip(extra_members, extra_cks)]], 12)
    root = Path(cache_dir) / dare_key
    model_dir = None
    if isinstance(base_ck, AlignedModel):  # resident models load the base with the shared vocabulary
        model_dir = root / "base"
        if not (model_dir / "config.json").exists():
            write_checkpoint(model_dir, base_ck, lambda name: None)
    dare_paths = [root / f"dare{i}" for i in range(len(experts))]
    if not all((p / "config.json").exists() for p in dare_paths):
        log.info("writing %d DARE experts (p=%.2f) to %s", len(experts), settings.drop_rate, root)
        for i, (expert, path) in enumerate(zip(expert_cks, dare_paths)):
            task = progress.start(f"sparsifying {expert.name} (DARE p={settings.drop_rate})",
                                  len(base_ck.tensor_names))
            try:
                _write_dare_expert(base_ck, expert, path, settings, tag=fps[i + 1], on_tensor=lambda _: task.advance())
            finally:
                task.close()
    dare_cks = [Checkpoint(p, name=f"dare({expert_cks[i].name})") for i, p in enumerate(dare_paths)]
    names = model_labels(experts)  # distinct even where two expert folders share a name
    labels = ["base"] + [f"expert:{n}" for n in names] + [f"dare:{n}" for n in names]
    labels += [label for label, _ in extra_members]
    return Basis([base_ck, *expert_cks, *dare_cks, *extra_cks], labels, key, settings.granularity, settings.storage,
                 n_experts=len(experts), model_dir=model_dir)


def _write_dare_expert(base: Model, expert: Model, out: Path, settings: BasisSettings, tag: str,
                       on_tensor=None) -> None:
    def sparsified(name: str) -> torch.Tensor:
        b, e = base.get(name), expert.get(name)
        check_finite(e, expert.name, name)
        delta = dare(task_vector(e, b), settings.drop_rate, generator(settings.seed, tag, name))
        return b.float() + delta

    write_checkpoint(out, base, sparsified, inputs=[expert], on_tensor=on_tensor)
