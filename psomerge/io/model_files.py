"""The files of a model folder besides its weights: config, generation config, tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def copy_model_files(base_dir: str | Path, out_dir: str | Path, dtype: torch.dtype) -> None:
    """Copy config (with the output dtype), generation config and tokenizer files of the base."""
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads((base_dir / "config.json").read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config["dtype"] = dtype_name
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    for fname in ("generation_config.json", *TOKENIZER_FILES):
        src = base_dir / fname
        if src.exists():
            shutil.copyfile(src, out_dir / fname)
