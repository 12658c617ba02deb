"""Reading and writing Hugging Face checkpoint folders, one tensor at a time."""

from psomerge.io.checkpoint import Checkpoint, TensorInfo
from psomerge.io.validate import check_compatible, check_finite
from psomerge.io.writer import StreamingSafetensorsWriter, copy_model_files, write_checkpoint

__all__ = [
    "Checkpoint",
    "TensorInfo",
    "StreamingSafetensorsWriter",
    "check_compatible",
    "check_finite",
    "copy_model_files",
    "write_checkpoint",
]
