"""Run a static merge recipe over checkpoint folders, streaming one tensor name at a time.

Peak memory is the inputs of one tensor name (memory-mapped) plus the fp32 working copies
and one output tensor, so models larger than RAM merge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from psomerge.errors import ConfigError
from psomerge.io import check_compatible, check_finite, open_model, write_checkpoint
from psomerge.io.vocab import align_vocabularies
from psomerge.io.writer import DEFAULT_SHARD_BYTES
from psomerge.merging.recipe import MergeRecipe
from psomerge.merging.task_vectors import seeded_rng

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    method: str
    num_tensors: int
    num_parameters: int
    seconds: float


def run_merge(
    recipe: MergeRecipe,
    out_dir: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_tensor: Callable[[str], None] | None = None,
) -> MergeResult:
    start = time.perf_counter()
    method = recipe.method
    merged = recipe.merged_models()
    paths = [recipe.resolve_path(m.model) for _, m in merged]
    base_path = recipe.resolve_path(recipe.base_model) if recipe.base_model else None
    seen: dict[Path, int] = {}
    for (i, m), path in zip(merged, paths):
        if method.requires_base and base_path is not None and path.resolve() == base_path.resolve():
            raise ConfigError(f"{recipe.source}: models[{i}] {m.model!r} is the base_model folder "
                              f"({recipe.base_model!r}) spelt another way: its task vector is zero; list it as "
                              "the base only")
        first = seen.setdefault(path.resolve(), i)
        if first != i:
            raise ConfigError(f"{recipe.source}: models[{i}] {m.model!r} is the folder of models[{first}] again: "
                              "list each model once (give it a larger weight instead)")
    base = open_model(base_path, name=recipe.base_model) if base_path is not None else None
    ckpts = [open_model(path, name=m.model, base=base) for (_, m), path in zip(merged, paths)]
    models = ([base] if base is not None else []) + ckpts
    reference, rest = align_vocabularies(models[0], models[1:], recipe.tokenizer_source, base_rule=base is not None)
    if base is not None:
        base, ckpts = reference, rest
    else:
        ckpts = [reference, *rest]
    check_compatible(reference, [c for c in ckpts if c is not reference])
    recipe.check_tensors([n for n in reference.tensor_names if reference.info(n).dtype.is_floating_point])

    def merge_tensor(name: str) -> torch.Tensor:
        ref_tensor = reference.get(name)
        tensors = [c.get(name) for c in ckpts]
        for ckpt, t in zip(ckpts, tensors):
            check_finite(t, ckpt.name, name)
        if base is not None:
            check_finite(ref_tensor, base.name, name)
        params = [recipe.model_params(i, name) for i, _ in merged]
        gens = [seeded_rng(recipe.seed, i, name) for i, _ in merged]  # by position: paths may move
        return method.merge(ref_tensor if base is not None else None, tensors, params, recipe.options(name), gens)

    log.info("merging %d tensors of %d model(s) with %s", len(reference.tensor_names), len(ckpts), method.name)
    out_dir = write_checkpoint(out_dir, reference, merge_tensor, dtype=recipe.output_dtype(reference.dtype),
                               inputs=ckpts, max_shard_bytes=max_shard_bytes, on_tensor=on_tensor)
    return MergeResult(
        out_dir=out_dir,
        method=method.name,
        num_tensors=len(reference.tensor_names),
        num_parameters=reference.num_parameters,
        seconds=time.perf_counter() - start,
    )
