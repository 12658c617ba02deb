"""Streaming sharded safetensors output, written into place only when complete.

The layout (shards, headers, offsets) is planned from the tensor names, shapes and dtypes
before any data exists, so each computed tensor goes to its place on disk at once: a
checkpoint is never held in memory (mergekit buffers a whole shard). ``write_checkpoint``
is the one loop every producer of a checkpoint uses (static merges, a swarm's merged model,
the DARE members of a basis); it stages the folder beside its destination and renames it
into place at the end, so a crash, a full disk or an error never leaves a loadable half
model, nor destroys a model already there.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from psomerge.errors import CheckpointError
from psomerge.io.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from psomerge.io.layout import itemsize, numel, plan_file
from psomerge.io.model_files import copy_model_files  # noqa: F401 - re-exported
from psomerge.io.models import Model

DEFAULT_SHARD_BYTES = 2 * 1024**3


class StreamingSafetensorsWriter:
    """Writes tensors, in any order, into safetensors shards planned up front.

    ``plan`` lists (name, shape, dtype) of every tensor the output will hold.
    """

    def __init__(
        self,
        out_dir: str | Path,
        plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        file_mode: int = 0o644,
    ):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        shard_bytes = 0
        for name, shape, dtype in plan:
            nbytes = numel(shape) * itemsize(dtype)
            if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
                shards.append([])
                shard_bytes = 0
            shards[-1].append((name, tuple(shape), dtype))
            shard_bytes += nbytes
        n = len(shards)
        self._files = []
        self._where: dict[str, tuple[int, int]] = {}  # name -> (shard, absolute offset)
        self._layouts = []
        self._names: list[str] = []
        for i, entries in enumerate(shards):
            fname = SAFETENSORS_SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            layout = plan_file(entries)
            path = self.out_dir / fname
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, file_mode)
            f = os.fdopen(fd, "r+b")
            f.write(layout.prefix)
            f.truncate(layout.size)
            self._files.append(f)
            self._layouts.append(layout)
            self._names.append(fname)
            for name, slot in layout.slots.items():
                self._where[name] = (i, layout.data_start + slot.offset)
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        try:
            i, offset = self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the planned output") from None
        slot = self._layouts[i].slots[name]
        if tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise CheckpointError(
                f"tensor {name!r}: planned {list(slot.shape)} {slot.dtype}, got {list(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        f = self._files[i]
        f.seek(offset)
        f.write(memoryview(data))
        self._written.add(name)

    def close(self) -> None:
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())
            f.close()
        self._files = []
        missing = sorted(set(self._where) - self._written)
        if missing:
            raise CheckpointError(
                f"output {self.out_dir}: {len(missing)} planned tensor(s) never written, e.g. {missing[:3]}"
            )
        if len(self._layouts) > 1:
            index = {
                "metadata": {"total_size": sum(layout.data_size for layout in self._layouts)},
                "weight_map": {n: self._names[w[0]] for n, w in self._where.items()},
            }
            (self.out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))

    def __enter__(self) -> "StreamingSafetensorsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for f in self._files:
                f.close()


def write_checkpoint(
    out_dir: str | Path,
    reference: Model,
    compute: Callable[[str], torch.Tensor | None],
    *,
    dtype: torch.dtype | None = None,
    inputs: Sequence[Model] = (),
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_tensor: Callable[[str], None] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write a checkpoint shaped like ``reference`` to ``out_dir``, tensor by tensor.

    Each floating tensor is ``compute(name)`` (fp32, or None to copy the reference's) cast to
    ``dtype``, or to the reference's own dtype for that tensor when ``dtype`` is None;
    integer tensors are copied from the reference. Config, generation config and tokenizer
    come from the reference, plus ``extra_files`` (name -> text). The folder is written
    beside ``out_dir`` and moved into place only when complete. Where any of ``inputs``
    (and the reference) is not world-readable, neither is the output.
    """
    out_dir = Path(out_dir)
    if out_dir.name in ("", ".", ".."):  # `--out .`: the staging folder is named after the folder
        out_dir = out_dir.resolve()
    _check_destination(out_dir, [reference, *inputs])
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file where a parent folder should be, a read-only folder
        raise CheckpointError(f"cannot write {out_dir}: cannot create its folder {out_dir.parent} "
                              f"({exc.strerror or exc})") from exc
    names = reference.tensor_names
    plan = []
    for name in names:
        info = reference.info(name)
        floating = info.dtype.is_floating_point
        plan.append((name, info.shape, (dtype or info.dtype) if floating else info.dtype))
    private = _is_private([reference, *inputs])
    _remove_abandoned_staging(out_dir)
    staging = out_dir.with_name(f"{_STAGING_PREFIX.format(out_dir.name)}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(mode=0o700 if private else 0o755)
    try:
        with StreamingSafetensorsWriter(staging, plan, max_shard_bytes, 0o600 if private else 0o644) as writer:
            for name, _, out_dtype in plan:
                value = compute(name) if out_dtype.is_floating_point else None
                if value is not None:
                    _check_computed(value, name, out_dir, out_dtype)
                    value = value.to(out_dtype)
                writer.write(name, reference.get(name).to(out_dtype) if value is None else value)
                if on_tensor:
                    on_tensor(name)
        reference.write_model_files(staging, dtype or reference.dtype)
        for fname, text in (extra_files or {}).items():
            (staging / fname).write_text(text)
        if private:
            for f in staging.iterdir():
                f.chmod(0o600)
        _replace_dir(staging, out_dir)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a file-size limit, a read-only folder
            kept = "the model already there is unchanged" if out_dir.exists() else "nothing was written"
            raise CheckpointError(f"cannot write {out_dir} ({exc.strerror or exc}); {kept}") from exc
        raise
    return out_dir


_STAGING_PREFIX = ".{}.partial-"  # then the writing process's id


def _check_destination(out_dir: Path, models: Sequence[Model]) -> None:
    """Refuse, before any work, an output folder whose replacement would destroy something
    that is not a model this tool wrote: an input model (or a folder holding one), a file, or
    a folder of other files. A folder holding a checkpoint (a previous merge) is replaced."""
    target = out_dir.resolve()
    for m in models:
        for folder in (getattr(m, "path", None), getattr(getattr(m, "base", None), "path", None)):
            if folder is not None and (target == Path(folder).resolve() or target in Path(folder).resolve().parents):
                raise CheckpointError(f"output {out_dir} is, or holds, the folder of input model {m.name!r} "
                                      f"({folder}): writing there would replace it; choose another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output {out_dir} exists and is not a folder; choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not _holds_checkpoint(out_dir):
        raise CheckpointError(f"output {out_dir} is a folder of other files (no config.json and weights), which "
                              "writing the model would replace as a whole: choose a new or empty folder, or remove it")


def _holds_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        (folder / f).is_file() for f in (SAFETENSORS_SINGLE, SAFETENSORS_INDEX, "pytorch_model.bin",
                                         "pytorch_model.bin.index.json"))


def _check_computed(value: torch.Tensor, name: str, out_dir: Path, out_dtype: torch.dtype) -> None:
    """A computed tensor with NaN or inf, or beyond the range of the output dtype (an overflow
    of fp16), is refused before it is written: a model of NaN would load and answer garbage.
    One min/max pass over the tensor as computed, no copy (a 70B embedding is 4 GB in fp32)."""
    if not value.is_floating_point() or value.numel() == 0:
        return
    lo, hi = (float(x) for x in torch.aminmax(value))
    limit = torch.finfo(out_dtype).max if out_dtype.is_floating_point else math.inf
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= limit:
        return
    nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
    where = (f"{nan} NaN, {inf} inf" if nan or inf
             else f"values up to {max(-lo, hi):.3g}, beyond {str(out_dtype).removeprefix('torch.')}'s range")
    raise CheckpointError(
        f"output {out_dir}: merged tensor {name!r} is not finite ({where}): check the merge's weights and "
        "parameters (a NaN or infinite value, or an overflow of the output dtype); nothing was written"
    )


def _remove_abandoned_staging(out_dir: Path) -> None:
    """Remove staging folders beside ``out_dir`` left by writers that died (killed, or the
    machine went down) before they could clean up: they are never models."""
    prefix = _STAGING_PREFIX.format(out_dir.name)
    for folder in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
        pid = folder.name.removeprefix(prefix)
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _is_private(checkpoints: Sequence[Model]) -> bool:
    """Whether the world cannot read one of these models: a weight, config or tokenizer file
    that is not world-readable, or a model folder that others may not enter."""
    for c in checkpoints:
        files = [*c.weight_files(), *getattr(c, "model_files", list)()]
        if any(not f.stat().st_mode & stat.S_IROTH for f in files) or \
                any(not d.stat().st_mode & stat.S_IXOTH for d in {f.parent for f in files}):
            return True
    return False


def _replace_dir(new: Path, dst: Path) -> None:
    """Move a finished folder to ``dst``; a folder already there is replaced only now."""
    if not dst.exists():
        new.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    shutil.rmtree(old, ignore_errors=True)
    dst.rename(old)
    try:
        new.rename(dst)
    except BaseException:
        old.rename(dst)  # put the previous model back
        raise
    shutil.rmtree(old, ignore_errors=True)


__all__ = ["StreamingSafetensorsWriter", "copy_model_files", "write_checkpoint", "DEFAULT_SHARD_BYTES"]
