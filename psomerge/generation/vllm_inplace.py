"""Particles written straight into a running vLLM engine's weights, in the engine's process.

Runs inside the vLLM worker (``vllm_worker.py``, the vLLM environment). vLLM fuses Hugging
Face tensors (q/k/v into ``qkv_proj``, gate/up into ``gate_up_proj``, pads the vocabulary,
ties embeddings), so where each checkpoint tensor lives in the engine is learnt once, from the
model's own weight loaders: each tensor is offered to ``model.load_weights`` as a probe, the
copy it would make is recorded (which parameter, which slice) and not performed
(``_LandingRecorder``). Per particle the basis then sums each tensor (fp32, rounded once into
the parameter's dtype) straight into its slice: no file, no reload, no restart.

That is only right where the engine computes with the tensors it loaded. ``probe_engine``
checks it at start and says why not otherwise:

- every parameter keeps the shape, stride and dtype vLLM recorded before
  ``process_weights_after_loading`` (its reload metadata); the CPU backend, for instance,
  replaces each linear layer's weight by an empty one and keeps a oneDNN-packed copy;
- on the CPU backend, every layer's GEMM dispatch (``cpu_linear``, set while processing) is
  torch's ``F.linear`` on the parameter: a packed dispatch keeps a hidden copy even where the
  weight stays (the LM head's);
- every mapped slice holds exactly the checkpoint's tensor (in the engine's dtype) after start.

``keep_cpu_linear_weights`` makes the CPU backend take vLLM's own unpacked fallback for every
linear layer (slower GEMMs, weights kept as loaded), so the in-engine path can run on a CPU.

Imports: torch at module level; vLLM and psomerge.io inside the functions that need them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def keep_cpu_linear_weights() -> None:
    """Before the engine starts: on vLLM's CPU backend, run unquantized linear layers (and the
    LM head) with ``F.linear`` on their weights as loaded instead of repacking them. This is the
    fallback vLLM itself takes where it cannot pack; other platforms never call the hook."""
    from vllm.model_executor.layers import utils

    packed = utils.dispatch_cpu_unquantized_gemm
    if getattr(packed, "keeps_weights", False):
        return

    def plain(layer: torch.nn.Module, remove_weight: bool) -> None:
        if layer.weight.is_meta or layer.weight.ndim != 2:  # not a plain linear weight: vLLM's own handling
            packed(layer, remove_weight)
            return
        layer.cpu_linear = torch.nn.functional.linear

    plain.keeps_weights = True
    utils.dispatch_cpu_unquantized_gemm = plain  # looked up at call time by the layers' processing


@dataclass(frozen=True)
class Landing:
    """Where a checkpoint tensor lands: a strided view of one engine parameter."""

    param: str
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class EngineWeights:
    """The result of ``probe_engine``: whether particles can be written in place, and where."""

    possible: bool
    reason: str
    landings: dict[str, list[Landing]] = field(default_factory=dict)  # HF name -> destinations
    skipped: list[str] = field(default_factory=list)  # HF names the loaders ignore (e.g. a tied LM head)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # parameter shapes when mapped

    def targets(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, list[torch.Tensor]]]:
        """(HF name -> its first destination view, HF name -> further destinations) of the
        model's current parameters."""
        params = _parameters(model)
        for name, shape in self.shapes.items():
            if tuple(params[name].shape) != shape:
                raise RuntimeError(f"engine parameter {name} changed shape from {list(shape)} to "
                                   f"{list(params[name].shape)} since it was mapped")

        def view(at: Landing) -> torch.Tensor:
            return torch.as_strided(params[at.param].data, at.size, at.stride, at.offset)

        first = {n: view(ats[0]) for n, ats in self.landings.items()}
        more = {n: [view(at) for at in ats[1:]] for n, ats in self.landings.items() if len(ats) > 1}
        return first, more


def _parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_buffers(remove_duplicate=False)),
            **dict(model.named_parameters(remove_duplicate=False))}


def probe_engine(model: torch.nn.Module, checkpoint: str | Path, on_cpu: bool) -> EngineWeights:
    """Map every floating tensor of ``checkpoint`` (the folder the engine loaded) onto the
    engine's parameters and check that writing there changes what the engine computes."""
    from psomerge.io import Checkpoint

    changed = _changed_in_processing(model)
    if changed:
        hint = "; on a CPU, generation.vllm.cpu_linear: plain keeps them as loaded" if on_cpu else ""
        return EngineWeights(False, f"the engine changed its weights after loading ({changed}), so only a reload "
                                    f"through its own processing reaches them{hint}")
    if on_cpu:
        packed = [n for n, m in model.named_modules()
                  if hasattr(m, "cpu_linear") and m.cpu_linear is not torch.nn.functional.linear]
        if packed:
            return EngineWeights(False, f"the CPU backend computes {len(packed)} layers from packed copies of their "
                                        f"weights (e.g. {packed[0]}); generation.vllm.cpu_linear: plain keeps them")
    with Checkpoint(checkpoint) as ckpt:
        names = [n for n in ckpt.tensor_names if ckpt.info(n).dtype.is_floating_point]
        landings, skipped = _record_landings(model, ckpt, names)
        if isinstance(landings, str):
            return EngineWeights(False, landings)
        mapped = EngineWeights(True, "", landings, skipped, {n: tuple(p.shape) for n, p in _parameters(model).items()})
        first, more = mapped.targets(model)
        for name in first:  # the slices hold what the engine loaded: the map is right and nothing was transformed
            loaded = ckpt.get(name)
            for view in [first[name], *more.get(name, [])]:
                if not torch.equal(view, loaded.to(device=view.device, dtype=view.dtype)):
                    return EngineWeights(False, f"checkpoint tensor {name} does not read back from the engine "
                                                f"parameter {landings[name][0].param} where its loader put it")
    return mapped


def _changed_in_processing(model: torch.nn.Module) -> str:
    """Parameters whose shape, stride or dtype differ from vLLM's record of them before
    ``process_weights_after_loading`` ('' if none; a note if vLLM keeps no such record)."""
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    except ImportError:
        return "this vLLM keeps no record of its weights before processing, so repacking cannot be ruled out"
    changes, seen = [], 0
    for module_name, module in model.named_modules():
        info = LAYERWISE_INFO.get(module)
        if info is None:
            continue
        recorded = info.restore_metadata[0]
        current = dict(module.named_parameters(recurse=False))
        for name, before in recorded.items():
            seen += 1
            now = current.get(name)
            where = f"{module_name}.{name}" if module_name else name
            if now is None:
                changes.append(f"{where} removed")
            elif (now.shape, now.stride(), now.dtype) != (before.shape, before.stride(), before.dtype):
                changes.append(f"{where}: {list(before.shape)} {str(before.dtype).removeprefix('torch.')} -> "
                               f"{list(now.shape)} {str(now.dtype).removeprefix('torch.')}")
    if not seen:
        return "vLLM recorded none of its weights before processing, so repacking cannot be ruled out"
    if changes:
        return f"{len(changes)} parameters, e.g. {'; '.join(changes[:2])}"
    return ""


class _LandingRecorder(TorchDispatchMode):
    """While one probe is offered to the loaders: where its copy would land (recorded, not
    performed) and whether anything else would write a parameter (a loader transform)."""

    def __init__(self, probe: torch.Tensor, owners: dict[int, str]):
        super().__init__()
        self.probe = probe.untyped_storage().data_ptr()
        self.numel = probe.numel()
        self.owners = owners  # storage address -> a parameter using it
        self.landed: list[Landing] = []
        self.problems: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default and _storage(args[1]) == self.probe:
            dst, src = args[0], args[1]
            owner = self.owners.get(_storage(dst))
            if owner is None:
                self.problems.append("the loader copies it into a temporary, not a parameter")
            elif src.numel() != self.numel or not src.is_contiguous() or src.storage_offset() != 0:
                self.problems.append(f"the loader copies part of it, or reorders it, into {owner}")
            else:
                self.landed.append(Landing(owner, tuple(dst.shape), tuple(dst.stride()), dst.storage_offset()))
            return dst
        written = _written_args(func, args, kwargs)
        hits = [self.owners[_storage(w)] for w in written if _storage(w) in self.owners]
        if hits:  # never performed: the engine's weights stay as they are
            if func not in _CONSTANT_WRITES:  # e.g. zeroing the vocabulary's padding rows: done at start-up already
                self.problems.append(f"the loader writes {hits[0]} with {func} (a transform, not a copy)")
            return written[0]
        return func(*args, **kwargs)


# writes that do not depend on the tensor loaded: start-up made them, a particle need not repeat them
_CONSTANT_WRITES = {torch.ops.aten.fill_.Scalar, torch.ops.aten.zero_.default}


def _storage(t) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


def _written_args(func, args, kwargs) -> list[torch.Tensor]:
    out = []
    for i, arg in enumerate(func._schema.arguments):
        if arg.alias_info is not None and arg.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            out += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, torch.Tensor)]
    return out


@torch.no_grad()
def _record_landings(model: torch.nn.Module, ckpt, names: list[str]) -> tuple[dict[str, list[Landing]] | str, list]:
    """Each name's destinations through ``model.load_weights``, one probe at a time (uninitialised,
    in the engine's dtype and device, so a loader's ``.to()`` keeps it as it is); or the reason
    none can be given."""
    params = _parameters(model)
    owners: dict[int, str] = {}
    for name, p in params.items():
        owners.setdefault(_storage(p), name)
    before = {n: (_storage(p), tuple(p.shape)) for n, p in params.items()}
    first = next(iter(model.parameters()))
    landings: dict[str, list[Landing]] = {}
    skipped: list[str] = []
    claimed: dict[tuple[str, int], str] = {}
    for name in names:
        probe = torch.empty(ckpt.info(name).shape, dtype=first.dtype, device=first.device)
        recorder = _LandingRecorder(probe, owners)
        try:
            with recorder:
                model.load_weights([(name, probe)])
        except Exception as exc:  # noqa: BLE001 - a loader that cannot take it: no in-place path, and why
            return f"the engine's loader refused checkpoint tensor {name} after start-up ({type(exc).__name__}: " \
                   f"{exc})", []
        if recorder.problems:
            return f"checkpoint tensor {name}: {recorder.problems[0]}", []
        if not recorder.landed:
            skipped.append(name)  # e.g. lm_head.weight of a model with tied embeddings: the reload ignores it too
            continue
        for at in recorder.landed:
            key = (at.param, at.offset)
            if key in claimed:
                return f"checkpoint tensors {claimed[key]} and {name} land on the same slice of {at.param}", []
            claimed[key] = name
        landings[name] = recorder.landed
    after = {n: (_storage(p), tuple(p.shape)) for n, p in _parameters(model).items()}
    if after != before:
        raise RuntimeError("mapping the engine's weights replaced some of its parameters; restart the engine")
    return landings, skipped
