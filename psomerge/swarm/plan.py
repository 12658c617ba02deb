"""A memory plan for a run on a GPU host, from safetensors headers alone (no tensor is read).

``plan_memory`` says what goes where for a basis layout and a generation backend: basis
members (dense, in their stored dtype) and DARE masks, the resident model or the vLLM
engine's weights, the KV cache / activation reserve, and whether members stay on the GPU or
in (pinned) host memory; for vLLM's in-engine path, the members in the engine's process
beside its weights and KV cache. ``MemoryPlan.check`` refuses a plan that does not fit, naming what
does not fit and by how much. ``psomerge plan CONFIG --gpu-memory 80GiB`` prints it.

Figures are bytes the run holds, not the allocator's rounding; the transformers activation
reserve is an estimate (KV cache of ``batch_size`` sequences of prompt + answer tokens, the
last position's logits and one layer's prefill activations, all fp32).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from psomerge.errors import ConfigError
from psomerge.generation.settings import TransformersSettings, VLLMSettings
from psomerge.io import Model, check_compatible
from psomerge.io.checkpoint import DTYPES
from psomerge.io.layout import itemsize
from psomerge.swarm.basis import Basis, BasisSettings, floating_names, open_members
from psomerge.swarm.masks import packed_size
from psomerge.swarm.materialise import CHUNK_ENTRIES

log = logging.getLogger(__name__)

GiB = 1024**3
CUDA_CONTEXT = 1 * GiB  # CUDA context and allocator slack of a process computing on the GPU (estimate)
GPU, HOST, PAGE_CACHE = "GPU", "host", "page cache"

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in '80GiB', '80G', '80GB', '512MiB' or '1000' (K, M, G, T are powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"size {text!r}: expected a number with an optional unit, e.g. 80GiB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper()))


class MemoryPlanError(ConfigError):
    """A run's members, model and reserves do not fit the memory given."""


@dataclass(frozen=True)
class ModelSize:
    """What the plan needs of a checkpoint: its floating tensors, from the headers."""

    name: str
    stored_bytes: int  # in their stored dtypes
    numel: int
    mask_bytes: int  # one bit per entry, packed per tensor
    largest: int  # entries of the largest tensor
    dtype: torch.dtype  # the dtype most entries are stored in

    @classmethod
    def of(cls, ckpt: Model) -> "ModelSize":
        infos = [ckpt.info(n) for n in floating_names(ckpt)]
        return cls(ckpt.name, sum(i.numel * itemsize(i.dtype) for i in infos), sum(i.numel for i in infos),
                   sum(packed_size(i.numel) for i in infos), max((i.numel for i in infos), default=0), ckpt.dtype)


@dataclass(frozen=True)
class Allocation:
    where: str  # GPU, host or page cache
    what: str
    nbytes: int


@dataclass
class MemoryPlan:
    allocations: list[Allocation]
    capacity: dict[str, int | None]  # GPU and host bytes; None: not checked
    members_on: str
    notes: list[str] = field(default_factory=list)
    limits: list[str] = field(default_factory=list)  # overflows found while planning (e.g. a vLLM budget)

    def used(self, where: str) -> int:
        return sum(a.nbytes for a in self.allocations if a.where == where)

    def problems(self) -> list[str]:
        out = list(self.limits)
        for where in (GPU, HOST):
            cap, used = self.capacity.get(where), self.used(where)
            if cap is not None and used > cap:
                biggest = max((a for a in self.allocations if a.where == where), key=lambda a: a.nbytes)
                out.append(f"{where} memory: the plan needs {gib(used)} of {gib(cap)}, over by {gib(used - cap)} "
                           f"(largest: {biggest.what}, {gib(biggest.nbytes)})")
        return out

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise MemoryPlanError("the run does not fit: " + "; ".join(problems + self.notes))

    def lines(self) -> list[str]:
        width = max(len(a.what) for a in self.allocations)
        rows = [f"{a.where:<10} {a.what:<{width}} {gib(a.nbytes):>10}" for a in self.allocations]
        for where in (GPU, HOST):
            cap = self.capacity.get(where)
            rows.append(f"{where:<10} {'total':<{width}} {gib(self.used(where)):>10}"
                        + (f" of {gib(cap)}" if cap is not None else " (host size not given: not checked)"))
        return [*rows, f"basis members: {self.members_on}", *self.notes]


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def plan_memory(
    base: str | Path,
    experts: Sequence[str | Path],
    basis: BasisSettings,
    generation: TransformersSettings | VLLMSettings,
    gpu_memory: int,
    host_memory: int | None = None,
    *,
    extra_members: Sequence[tuple[str, str | Path]] = (),
    planned_extras: int = 0,
    judge_servers: Sequence[tuple[str, float]] = (),
    prompt_tokens: int = 512,
) -> MemoryPlan:
    """The plan for one run on a GPU of ``gpu_memory`` bytes (and, when given, a host of
    ``host_memory``): only headers, adapter and tokenizer configs are read. ``planned_extras``:
    extra members not written yet (warm-start static merges, stored like the base);
    ``judge_servers``: (suite, memory_fraction) of each vLLM judge server the run starts on the GPU."""
    base_ck, experts_ck, extras = open_members(base, experts, extra_members, basis.tokenizer_source)
    check_compatible(base_ck, experts_ck + extras)
    ref = ModelSize.of(base_ck)
    dense = [ref, *(ModelSize.of(c) for c in experts_ck + extras), *[ref] * planned_extras]
    n, k = len(experts), len(dense) + len(experts)
    plan = MemoryPlan([], {GPU: gpu_memory, HOST: host_memory}, "")
    for suite, fraction in judge_servers:
        plan.allocations.append(Allocation(GPU, f"vLLM judge server of suite {suite!r} "
                                                f"(memory_fraction {fraction})", int(fraction * gpu_memory)))
    if isinstance(generation, VLLMSettings):
        in_engine = plans_in_engine(generation, basis)
        dtype = _place_engine(plan, generation, basis, ref, gpu_memory, in_engine)
        if in_engine:
            _place_members_in_engine(plan, generation, dense, n, ref, gpu_memory, dtype)
        else:
            _place_members(plan, basis, dense, n, k, ref)
    else:
        _place_members(plan, basis, dense, n, k, ref)
        _place_resident(plan, generation, basis, ref, base_ck.config, prompt_tokens, len(dense))
    return plan


def plans_in_engine(generation: VLLMSettings, basis: BasisSettings) -> bool:
    """Whether a vLLM run is planned with the basis in the engine's process: ``in_engine``, and
    ``auto`` (a CUDA engine computes unquantized layers with its weights as loaded), with a
    basis layout the engine's sum reproduces."""
    return generation.vllm.weight_update != "shared_file" and basis.sums_like_masks


def _members_label(dense: list[ModelSize], n: int) -> tuple[str, str]:
    dtypes = ", ".join(sorted({str(d.dtype).removeprefix("torch.") for d in dense}))
    extras = f" + {len(dense) - 1 - n} extras" if len(dense) > 1 + n else ""
    return f"basis members: base + {n} experts{extras}", dtypes


def _place_members(plan: MemoryPlan, basis: BasisSettings, dense: list[ModelSize], n: int, k: int,
                   ref: ModelSize) -> None:
    storage = basis.storage
    what, names = _members_label(dense, n)
    stored = sum(d.stored_bytes for d in dense)
    masks = n * ref.mask_bytes
    if basis.sums_like_masks:
        where = {"ram": HOST, "cuda": GPU, "pinned": HOST, "mmap": PAGE_CACHE}[storage]
        plan.allocations += [Allocation(where, f"{what} (dense, {names})", stored),
                             Allocation(where, f"DARE masks: {n} x 1 bit per parameter", masks)]
        plan.members_on = {"ram": "host memory", "cuda": "GPU", "pinned": "pinned host memory, summed on the GPU",
                           "mmap": "page cache (memory-mapped, read per particle; not held)"}[storage]
    elif storage == "ram_dense":
        plan.allocations.append(Allocation(HOST, f"basis: {k} members dense in fp32 (storage ram_dense)",
                                           k * ref.numel * 4))
        plan.members_on = "host memory (fp32)"
    else:  # compact: dense fp32 plus the expected survivors of each DARE member (int32 index + fp32 value)
        survivors = int(n * (1 - basis.drop_rate) * ref.numel)
        plan.allocations += [Allocation(HOST, f"{what} (dense, fp32)", len(dense) * ref.numel * 4),
                             Allocation(HOST, f"DARE members as sparse deltas (~{1 - basis.drop_rate:.0%} kept)",
                                        survivors * 8)]
        plan.members_on = "host memory (fp32, DARE members sparse)"
    if storage == "pinned":
        plan.allocations.append(Allocation(GPU, "staging of one tensor chunk of every member (fp32)",
                                           sum_scratch_bytes(ref, len(dense))))


def sum_scratch_bytes(ref: ModelSize, dense_members: int) -> int:
    """GPU temporaries of the chunked (torch) sum at their peak: each member's chunk in fp32,
    the term chunk and the masked coefficients' chunk (fp32), and one unpacked mask (a byte per
    entry; unpacking it takes three, before the coefficients' chunk exists)."""
    staged = min(ref.largest, CHUNK_ENTRIES)
    return (dense_members + 2) * staged * 4 + staged


def engine_basis_bytes(dense: Sequence[ModelSize], n_masks: int, engine_dtype: torch.dtype) -> tuple[int, int, int]:
    """(members, masks, sum temporaries): the bytes a vLLM engine's process needs to hold a
    basis and sum particles into its weights on the GPU (the in-engine path), as
    ``engine_basis`` places it and ``plan_memory`` plans it. The temporaries are the
    chunked sum's, and one tensor's fp32 sum where the engine's weights are in another dtype."""
    ref = dense[0]
    fp32_tensor = ref.largest * 4 if engine_dtype != torch.float32 else 0  # Basis.materialise's scratch
    return (sum(d.stored_bytes for d in dense), n_masks * ref.mask_bytes,
            fp32_tensor + sum_scratch_bytes(ref, len(dense)))


def _place_members_in_engine(plan: MemoryPlan, generation: VLLMSettings, dense: list[ModelSize], n: int,
                             ref: ModelSize, gpu_memory: int, dtype: torch.dtype) -> None:
    """The basis where the engine's process puts it (``engine_basis``): on the GPU
    where members, masks and the sum's temporaries fit beside the engine, else pinned host
    memory, summed on the GPU chunk by chunk."""
    what, names = _members_label(dense, n)
    stored, masks, scratch = engine_basis_bytes(dense, n, dtype)
    needed, free = stored + masks + scratch, gpu_memory - plan.used(GPU)
    where = GPU if needed <= free else HOST
    plan.allocations += [
        Allocation(where, f"{what} (dense, {names}) in the vLLM engine's process", stored),
        Allocation(where, f"DARE masks: {n} x 1 bit per parameter, in the vLLM engine's process", masks),
        Allocation(GPU, "sum temporaries: fp32 tensor and chunks (in the vLLM engine's process)", scratch)]
    plan.members_on = ("GPU, in the vLLM engine's process: each particle summed into the engine's weights"
                       if where == GPU else "pinned host memory of the vLLM engine's process, summed on the GPU "
                                            "into the engine's weights")
    fraction = generation.vllm.memory_fraction
    if where == HOST:
        others = plan.used(GPU) - int(fraction * gpu_memory) - scratch
        room = (gpu_memory - others - needed) / gpu_memory  # the largest fraction leaving the members room
        if room * gpu_memory > ref.numel * itemsize(dtype):
            plan.notes.append(f"generation.vllm.memory_fraction <= {int(room * 100) / 100:.2f} (now {fraction}) "
                              f"would leave the members ({gib(stored + masks)}) room on the GPU")
    plan.notes.append("the run process holds no members: it sends the engine coefficients, and reads the members "
                      "from their files once, for the merged model")
    if generation.vllm.weight_update == "auto":
        plan.notes.append("weight_update auto: planned for in_engine (what a CUDA engine's unquantized layers allow); "
                          "should the engine's start-up check refuse, particles go through the shared file "
                          "(plan it with weight_update: shared_file)")


def _place_engine(plan: MemoryPlan, generation: VLLMSettings, basis: BasisSettings, ref: ModelSize,
                  gpu_memory: int, in_engine: bool) -> torch.dtype:
    """The engine's weights and KV cache, and the shared file in /dev/shm; for the shared-file
    path also the host scratch of the sum. Returns the engine's dtype."""
    v = generation.vllm
    if v.dtype == "auto":  # vLLM keeps 16-bit checkpoints as they are and runs fp32 ones in 16 bits
        dtype = ref.dtype if itemsize(ref.dtype) <= 2 else torch.bfloat16
    else:
        dtype = DTYPES[v.dtype]
    label = str(dtype).removeprefix("torch.")
    weights = ref.numel * itemsize(dtype)
    budget = int(v.memory_fraction * gpu_memory)
    plan.allocations += [Allocation(GPU, f"vLLM engine weights ({label})", weights),
                         Allocation(GPU, f"vLLM KV cache and activations (rest of memory_fraction {v.memory_fraction})",
                                    max(0, budget - weights))]
    # checkpoints reach the engine through the file on either path (the static baselines, the promotion
    # gate's champion: evaluate_checkpoint), so the in-engine path has it too, from the first of them on
    which = " (checkpoints only: baselines, the gate's champion)" if in_engine else ""
    plan.allocations.append(Allocation(HOST, f"shared weight file in /dev/shm ({label}) the engine reloads from{which}",
                                       weights))
    if not in_engine and dtype != torch.float32:
        plan.allocations.append(Allocation(HOST, "fp32 scratch for one tensor of the sum", ref.largest * 4))
    if weights >= budget:
        plan.limits.append(f"vLLM engine weights ({label}, {gib(weights)}) exceed generation.vllm.memory_fraction "
                           f"x GPU ({v.memory_fraction} x {gib(gpu_memory)} = {gib(budget)}) by "
                           f"{gib(weights - budget)}, leaving no room for the KV cache")
    if basis.storage in ("cuda", "pinned"):
        plan.limits.append(f"basis.storage {basis.storage!r} does not combine with the vLLM backend (the engine owns "
                           "the GPU, and its process places the basis itself); use ram or mmap")
    return dtype


def _place_resident(plan: MemoryPlan, generation: TransformersSettings, basis: BasisSettings, ref: ModelSize,
                    config: dict, prompt_tokens: int, dense_members: int) -> None:
    where = GPU if basis.resident_device == "cuda" else HOST
    tokens = prompt_tokens + generation.max_new_tokens
    plan.allocations += [
        Allocation(where, "resident model (fp32, transformers)", ref.numel * 4),
        Allocation(where, f"activation reserve: KV cache, logits, prefill of {generation.batch_size} x {tokens} "
                          "tokens (fp32, estimate)", _activation_bytes(config, generation.batch_size, tokens)),
    ]
    if where == GPU:
        plan.allocations.append(Allocation(GPU, "CUDA context and allocator slack (estimate)", CUDA_CONTEXT))
        if basis.storage == "cuda":
            members = sum(a.nbytes for a in plan.allocations if a.what.startswith(("basis members", "DARE masks")))
            without = plan.used(GPU) - members + sum_scratch_bytes(ref, dense_members)
            if plan.used(GPU) > (plan.capacity[GPU] or 0) and without <= (plan.capacity[GPU] or 0):
                plan.notes.append(f"basis.storage: pinned would keep the members ({gib(members)}) in host memory "
                                  f"and need {gib(without)} of GPU memory")
    else:
        plan.notes.append(f"the GPU is not used: with basis.storage {basis.storage!r} the transformers resident model "
                          "lives in host memory; storage cuda or pinned puts it on the GPU")


def _activation_bytes(config: dict, batch: int, tokens: int) -> int:
    """KV cache + last-position logits + one layer's prefill activations, fp32 (an estimate)."""
    def key(*names: str) -> int:
        for name in names:
            if config.get(name):
                return int(config[name])
        raise ConfigError(f"config.json of the base has none of {', '.join(names)}: cannot size the activations")

    layers = key("num_hidden_layers", "n_layer")
    hidden = key("hidden_size", "n_embd")
    heads = key("num_attention_heads", "n_head")
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    intermediate = int(config.get("intermediate_size") or 4 * hidden)
    vocab = key("vocab_size")
    kv = 2 * layers * kv_heads * head_dim * batch * tokens
    return 4 * (kv + batch * vocab + batch * tokens * (4 * hidden + 2 * intermediate))


def engine_basis(spec: dict, parent_storage: str, device: str, dtype: torch.dtype):
    """The basis ``spec`` describes, held for summing into this engine (whose weights are in
    ``dtype``): on a CUDA engine on the GPU where members, masks and the sum's temporaries fit
    in what the engine left free, else in pinned host memory (summed on the GPU chunk by chunk);
    on a CPU engine in host memory, or read from the files per particle where the run chose
    ``mmap``. The bytes are those ``plan_memory`` plans with (``engine_basis_bytes``)."""
    opened = Basis.from_spec(spec, "mmap")  # nothing read yet
    if device == "cuda":
        members, masks, scratch = engine_basis_bytes([ModelSize.of(c) for c in opened.checkpoints],
                                                     len(opened.masks), dtype)
        held, needed = members + masks, members + masks + scratch
        free, _ = torch.cuda.mem_get_info()
        storage = "cuda" if needed <= free else "pinned"
        log.info("basis of %s: %s on the GPU with %s free: %s", gib(held), gib(needed), gib(free), storage)
    else:
        storage = "mmap" if parent_storage == "mmap" else "ram"
    return opened.with_storage(storage)
