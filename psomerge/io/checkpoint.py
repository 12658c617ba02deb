"""Lazy, memory-mapped access to the tensors of a Hugging Face checkpoint folder.

A merge touches one tensor name at a time across all models, so nothing here loads a
whole state dict: safetensors files are memory-mapped and read tensor by tensor, and
`.bin` files (the fallback) are opened with ``torch.load(mmap=True)``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from psomerge.errors import CheckpointError
from psomerge.hashing import digest
from psomerge.io.model_files import TOKENIZER_FILES, copy_model_files

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# Floating dtypes by the names configs use (recipes' out_dtype, vLLM's dtype).
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

_FINGERPRINTS: dict[tuple, str] = {}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers

# Files beside the weights that change what a model answers: fingerprints cover them, and any
# other top-level file with a suffix in MODEL_FILE_SUFFIXES (tokenizers come in many layouts).
MODEL_FILES = ("config.json", "generation_config.json", *TOKENIZER_FILES)
MODEL_FILE_SUFFIXES = (".json", ".model", ".txt", ".jinja", ".tiktoken")

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, read without touching tensor data, checked
    against the file: a sane header length, a JSON object, and per tensor a known dtype and
    data offsets that fit its shape and lie inside the file (a truncated file, or a header
    that lies about a dtype or a shape, is refused here rather than read as garbage)."""
    return _header_and_data_start(path)[0]


def tensor_spans(path: Path) -> dict[str, tuple[int, int]]:
    """Name -> (first byte, end byte) of each tensor's data in a safetensors file, from its
    checked header alone."""
    header, start = _header_and_data_start(path)
    return {n: (start + m["data_offsets"][0], start + m["data_offsets"][1]) for n, m in header.items()
            if n != "__metadata__"}


def _header_and_data_start(path: Path) -> tuple[dict[str, Any], int]:
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > min(MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {size} bytes, "
                                      f"file {file_size} bytes)")
            header = json.loads(f.read(size))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    _check_offsets(path, header, file_size - 8 - size)
    return header, 8 + size  # tensor data follow the 8-byte length and the header


def _check_offsets(path: Path, header: dict[str, Any], data_size: int) -> None:
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES.get(meta["dtype"])
            shape = [int(d) for d in meta["shape"]]
            start, stop = (int(o) for o in meta["data_offsets"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry ({exc!r})") from None
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta['dtype']}")
        n = 1
        for d in shape:
            n *= d
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or not 0 <= start <= stop or stop - start != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} is {meta['dtype']} {shape} ({nbytes} bytes), but its "
                                  f"data offsets [{start}, {stop}] hold {stop - start}: the header is corrupt")
        end = max(end, stop)
    if end > data_size:
        raise CheckpointError(f"{path}: truncated: its header places tensor data up to byte {end}, but the file "
                              f"holds {data_size} bytes of data")
    if end < data_size:
        raise CheckpointError(f"{path}: {data_size - end} bytes follow its last tensor's data: the header is corrupt "
                              f"or the file was appended to")


class Checkpoint:
    """A checkpoint folder opened lazily. ``name`` is how errors refer to it."""

    def __init__(self, path: str | Path, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        if not self.path.is_dir():
            raise CheckpointError(f"model {self.name!r}: {self.path} is not a directory")
        self._handles: dict[str, Any] = {}  # open safetensors files / mmapped .bin dicts
        self.config: dict[str, Any] = self._read_config()
        self.format, self._infos = self._index()

    # -- discovery -----------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        cfg = self.path / "config.json"
        if not cfg.exists():
            raise CheckpointError(f"model {self.name!r}: no config.json in {self.path}")
        try:
            config = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"model {self.name!r}: {cfg} is not valid JSON ({exc})") from exc
        if not isinstance(config, dict):
            raise CheckpointError(f"model {self.name!r}: {cfg} is not a model config (a JSON object), "
                                  f"but a JSON {type(config).__name__}")
        return config

    def _index(self) -> tuple[str, dict[str, TensorInfo]]:
        p = self.path
        if (p / SAFETENSORS_INDEX).exists():
            weight_map = self._weight_map(p / SAFETENSORS_INDEX)
            infos = self._safetensors_infos(sorted(set(weight_map.values())), weight_map)
            return "safetensors", self._check_index(SAFETENSORS_INDEX, weight_map, infos)
        if (p / SAFETENSORS_SINGLE).exists():
            return "safetensors", self._safetensors_infos([SAFETENSORS_SINGLE])
        if (p / BIN_INDEX).exists():
            weight_map = self._weight_map(p / BIN_INDEX)
            infos = self._bin_infos(sorted(set(weight_map.values())), weight_map)
            return "bin", self._check_index(BIN_INDEX, weight_map, infos)
        if (p / BIN_SINGLE).exists():
            return "bin", self._bin_infos([BIN_SINGLE])
        raise CheckpointError(
            f"model {self.name!r}: no weights in {p} (looked for {SAFETENSORS_INDEX}, "
            f"{SAFETENSORS_SINGLE}, {BIN_INDEX}, {BIN_SINGLE})"
        )

    def _weight_map(self, index_path: Path) -> dict[str, str]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"model {self.name!r}: bad index file {index_path} ({exc!r})") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"model {self.name!r}: bad index file {index_path} (its weight_map is not a "
                                  "mapping of tensor name to shard file)")
        for fname in set(weight_map.values()):
            if not (self.path / fname).exists():
                raise CheckpointError(
                    f"model {self.name!r}: {index_path.name} names shard {fname}, which is missing"
                )
        return weight_map

    def _safetensors_infos(self, files: list[str], weight_map: dict[str, str] | None = None) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for fname in files:
            try:
                header = read_safetensors_header(self.path / fname)
            except CheckpointError as exc:
                raise CheckpointError(f"model {self.name!r}: {exc}") from None
            for tname, meta in header.items():
                if tname != "__metadata__":
                    info = TensorInfo(tname, tuple(meta["shape"]), SAFETENSORS_DTYPES[meta["dtype"]], fname)
                    self._add_info(infos, info, weight_map)
        return infos

    def _bin_infos(self, files: list[str], weight_map: dict[str, str] | None = None) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        for fname in files:
            for tname, t in self._bin_state(fname).items():
                self._add_info(infos, TensorInfo(tname, tuple(t.shape), t.dtype, fname), weight_map)
        return infos

    def _add_info(self, infos: dict[str, TensorInfo], info: TensorInfo, weight_map: dict[str, str] | None) -> None:
        """Record a tensor found in a shard; where two shards hold it, the index says which one counts."""
        if weight_map is not None and weight_map.get(info.name, info.file) != info.file:
            return  # the index places it in another shard (checked there)
        if info.name in infos:
            raise CheckpointError(f"model {self.name!r}: tensor {info.name!r} is in both {infos[info.name].file} and "
                                  f"{info.file}, and the index does not say which one counts")
        infos[info.name] = info

    def _check_index(self, index: str, weight_map: dict[str, str],
                     infos: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
        """Every tensor the index names is in the shard it names (else the checkpoint is incomplete or mixed)."""
        wrong = sorted(n for n, fname in weight_map.items() if n not in infos)
        if wrong == [n for n in wrong if n.endswith("lm_head.weight")] and wrong \
                and self.config.get("tie_word_embeddings", True) is not False:
            # a tied model re-sharded with its old index: transformers re-ties lm_head on load
            log.warning("model %r: %s names %s, which no shard holds; the model ties it to its input embedding",
                        self.name, index, wrong[0])
            wrong = []
        if wrong:
            shown = ", ".join(f"{n!r} ({weight_map[n]})" for n in wrong[:5])
            more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
            raise CheckpointError(f"model {self.name!r}: {index} places {len(wrong)} tensor(s) in shards that do not "
                                  f"hold them: {shown}{more}; the checkpoint is incomplete or its shards are mixed up")
        return infos

    def _bin_state(self, fname: str) -> dict[str, torch.Tensor]:
        if fname not in self._handles:
            try:
                state = torch.load(
                    self.path / fname, map_location="cpu", mmap=True, weights_only=True
                )
            except Exception as exc:  # torch raises many types for corrupt files
                raise CheckpointError(f"model {self.name!r}: cannot read {fname} ({exc})") from exc
            self._handles[fname] = state
        return self._handles[fname]

    # -- access --------------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"model {self.name!r} has no tensor {name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name``, memory-mapped where the format allows it."""
        info = self.info(name)
        if self.format == "bin":
            return self._bin_state(info.file)[name]
        try:
            handle = self._handles.get(info.file)
            if handle is None:
                handle = safe_open(str(self.path / info.file), framework="pt", device="cpu")
                self._handles[info.file] = handle
            return handle.get_tensor(name)
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"model {self.name!r}: cannot read tensor {name!r} from "
                                  f"{self.path / info.file} ({exc})") from exc

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most floating-point tensors are stored in."""
        counts: dict[torch.dtype, int] = {}
        for info in self._infos.values():
            if info.dtype.is_floating_point:
                counts[info.dtype] = counts.get(info.dtype, 0) + info.numel
        return max(counts, key=counts.get) if counts else torch.float32

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    def weight_files(self) -> list[Path]:
        return sorted({self.path / i.file for i in self._infos.values()})

    def model_files(self) -> list[Path]:
        """Files beside the weights that change answers: config, generation config, tokenizer."""
        return sorted(f for f in self.path.iterdir()
                      if f.is_file() and (f.name in MODEL_FILES or f.suffix in MODEL_FILE_SUFFIXES))

    def weights_fingerprint(self) -> str:
        """Content hash of the weight files alone."""
        return hash_files(self.weight_files())

    def fingerprint(self) -> str:
        """Content hash of everything that makes this model answer as it does: the weight
        files, config.json, generation_config.json and the tokenizer files (not where they
        live). Every cache key built on a model uses it, so an edited config or tokenizer, or
        an expert retrained in place, never serves a stale score."""
        weights = self.weights_fingerprint()
        weight_files = set(self.weight_files())
        return digest([weights, hash_files([f for f in self.model_files() if f not in weight_files], names=True)])

    def write_model_files(self, out_dir: str | Path, dtype: torch.dtype) -> None:
        """Config (with ``dtype``), generation config and tokenizer files of this model, for
        a checkpoint written in its shape."""
        copy_model_files(self.path, out_dir, dtype)

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self._infos)} tensors, {self.format})"


def model_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short, distinct names for model folders: the folder's name, with as many parent
    folders as it takes to tell folders of the same name apart (``a/math``, ``b/math``)."""
    parts = [Path(p).resolve().parts[1:] for p in paths]  # without the root
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clashing = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # the same folder twice (refused by run configs)
        seen[label] = seen.get(label, 0) + 1
        if seen[label] > 1:
            labels[i] = f"{label}#{seen[label]}"
    return labels


def hash_files(files: list[Path], names: bool = False) -> str:
    """Content hash of ``files`` in order (with their names when ``names``), memoised per
    process by (path, size, mtime): validation, the basis, baselines and the registry all
    ask, and hashing a 7B checkpoint takes a while."""
    stats = [(f, f.stat()) for f in files]
    stamp = (names, *((str(f.resolve()), st.st_size, st.st_mtime_ns) for f, st in stats))
    if stamp not in _FINGERPRINTS:
        h = hashlib.blake2b(digest_size=16)
        for f, st in stats:
            if names:  # name and length first, so no two file sets hash alike
                h.update(f"{f.name}:{st.st_size}\n".encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
        _FINGERPRINTS[stamp] = h.hexdigest()
    return _FINGERPRINTS[stamp]
