"""Reading and writing Hugging Face checkpoint folders, one tensor at a time."""

from psomerge.io.checkpoint import Checkpoint, TensorInfo, model_labels
from psomerge.io.lora import LoraExpert, is_adapter
from psomerge.io.models import Model, open_model
from psomerge.io.validate import check_compatible, check_finite, check_weights
from psomerge.io.vocab import AlignedModel, align_vocabularies
from psomerge.io.writer import StreamingSafetensorsWriter, copy_model_files, write_checkpoint

__all__ = [
    "AlignedModel",
    "Checkpoint",
    "LoraExpert",
    "Model",
    "TensorInfo",
    "StreamingSafetensorsWriter",
    "align_vocabularies",
    "check_compatible",
    "check_finite",
    "check_weights",
    "model_labels",
    "copy_model_files",
    "is_adapter",
    "open_model",
    "write_checkpoint",
]
