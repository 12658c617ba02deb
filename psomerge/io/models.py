"""One door for every model folder: a checkpoint, or a PEFT LoRA adapter over a base."""

from __future__ import annotations

from pathlib import Path

from psomerge.errors import CheckpointError
from psomerge.io.checkpoint import Checkpoint
from psomerge.io.lora import LoraExpert, is_adapter
from psomerge.io.vocab import AlignedModel

# What opens as a model: a checkpoint folder, an adapter over its base, either one seen
# through a shared vocabulary. All answer the same calls (names, info, get, config,
# fingerprint, weight_files, write_model_files, close).
Model = Checkpoint | LoraExpert | AlignedModel


def open_model(path: str | Path, name: str | None = None, *, base: Checkpoint | str | Path | None = None) -> Model:
    """The model in ``path``: a checkpoint folder, or, where the folder holds a PEFT adapter
    (``adapter_config.json``), the full expert it makes of ``base``."""
    name = name or str(path)
    if not is_adapter(path):
        return Checkpoint(path, name=name)
    if base is None:
        raise CheckpointError(
            f"model {name!r}: {path} is a PEFT adapter folder; it needs the base model it was trained on "
            "(base_model in a recipe, base in a run config)"
        )
    if not isinstance(base, Checkpoint):
        if is_adapter(base):
            raise CheckpointError(f"model {name!r}: its base {str(base)!r} is itself an adapter folder")
        base = Checkpoint(base, name=str(base))
    return LoraExpert(path, base, name=name)
