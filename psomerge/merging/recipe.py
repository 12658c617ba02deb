"""mergekit-compatible merge recipes (YAML), validated with errors naming file and key."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from psomerge.errors import ConfigError
from psomerge.io.checkpoint import DTYPES
from psomerge.io.vocab import TOKENIZER_SOURCES
from psomerge.merging.methods import MergeMethod, MergeOptions, ModelParams, get_method
from psomerge.merging.sparsify import RESCALES, Rescale
from psomerge.yamlconfig import read_yaml, validate

# A parameter is a number, or mergekit's filter list: [{filter: "mlp", value: 0.5}, {value: 1}].
ParamValue = float | int | bool | str | list[dict[str, Any]]


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, ParamValue] = {}


class MergeRecipe(BaseModel):
    """mergekit's recipe format for the methods psomerge implements."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[RecipeModel]
    parameters: dict[str, ParamValue] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # base | union: models with different tokenizers
    seed: int = 0  # psomerge extension: seeds DARE / DELLA masks (mergekit draws unseeded)
    source: str = "<recipe>"  # where it came from, for error messages

    @classmethod
    def load(cls, path: str | Path) -> "MergeRecipe":
        return cls.from_dict(read_yaml(path, "recipe"), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<recipe>") -> "MergeRecipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: a recipe is a mapping with merge_method, models, ...")
        if "slices" in data:
            raise ConfigError(f"{source}: key 'slices' (layer-wise passthrough) is not supported; use 'models'")
        recipe = validate(cls, data, source)
        recipe.check()
        return recipe

    # -- semantics -----------------------------------------------------------------
    @property
    def method(self) -> MergeMethod:
        try:
            return get_method(self.merge_method)
        except ConfigError as exc:
            raise ConfigError(f"{self.source}: {exc}") from None

    def check(self) -> None:
        method = self.method
        if method.requires_base and not self.base_model:
            raise ConfigError(f"{self.source}: merge_method {self.merge_method!r} needs 'base_model'")
        if self.tokenizer_source not in (None, *TOKENIZER_SOURCES):
            raise ConfigError(
                f"{self.source}: tokenizer_source {self.tokenizer_source!r} is not supported: use 'base' (the base "
                "vocabulary; experts' extra tokens dropped) or 'union' (every model's tokens)"
            )
        for key in self.parameters:
            if key not in method.shared_keys and key not in method.model_keys:
                raise ConfigError(
                    f"{self.source}: parameters.{key} is not a parameter of {self.merge_method} "
                    f"(known: {', '.join(sorted(method.shared_keys | method.model_keys))})"
                )
        for i, entry in enumerate(self.models):
            if "+" in entry.model:
                raise ConfigError(f"{self.source}: models[{i}].model {entry.model!r}: LoRA '+' syntax is not supported")
            if self.is_base(entry):
                continue
            for key in entry.parameters:
                if key not in method.model_keys and key not in method.shared_keys:
                    raise ConfigError(
                        f"{self.source}: models[{i}].parameters.{key} is not a parameter of "
                        f"{self.merge_method} (known: {', '.join(sorted(method.model_keys))})"
                    )
            if "weight" not in entry.parameters and "weight" not in self.parameters:
                raise ConfigError(f"{self.source}: models[{i}].parameters.weight is required")
            for key, value in entry.parameters.items():
                _check_param(key, value, f"{self.source}: models[{i}].parameters.{key}")
        for key, value in self.parameters.items():
            _check_param(key, value, f"{self.source}: parameters.{key}")
        if not self.merged_models():
            raise ConfigError(f"{self.source}: models lists no model to merge"
                              + (" besides the base" if self.models else ""))
        for dkey in ("dtype", "out_dtype"):
            value = getattr(self, dkey)
            if value is not None and value not in DTYPES:
                raise ConfigError(f"{self.source}: {dkey} {value!r} is not one of {sorted(DTYPES)}")

    def check_tensors(self, tensor_names: list[str]) -> None:
        """Resolve every parameter for every tensor and let the method check it, before any
        tensor is merged: a filter list without a default, or a value the method cannot use
        for some tensor (DELLA's density -/+ epsilon), fails before work rather than midway."""
        method = self.method
        for name in tensor_names:
            options = self.options(name)
            for i, entry in self.merged_models():
                try:
                    method.check_params(self.model_params(i, name), options)
                except ValueError as exc:
                    raise ConfigError(f"{self.source}: models[{i}] ({entry.model}), tensor {name!r}: {exc}") from None

    def is_base(self, entry: RecipeModel) -> bool:
        """For task-arithmetic methods the base listed among models contributes no delta."""
        return self.method.requires_base and entry.model == self.base_model

    def merged_models(self) -> list[tuple[int, RecipeModel]]:
        return [(i, m) for i, m in enumerate(self.models) if not self.is_base(m)]

    def output_dtype(self, base_dtype: torch.dtype) -> torch.dtype:
        name = self.out_dtype or self.dtype
        return DTYPES[name] if name else base_dtype

    def options(self, tensor_name: str) -> MergeOptions:
        normalize = self.parameters.get("normalize", self.method.default_normalize)
        return MergeOptions(
            normalize=bool(_flag(_resolve(normalize, tensor_name, "parameters.normalize", self.source))),
            lam=float(_resolve(self.parameters.get("lambda", 1.0), tensor_name, "parameters.lambda", self.source)),
            rescale=_rescale(_resolve(self.parameters.get("rescale", "inverse"), tensor_name, "parameters.rescale",
                                      self.source)),
            int8_mask=bool(_flag(_resolve(self.parameters.get("int8_mask", False), tensor_name,
                                          "parameters.int8_mask", self.source))),
        )

    def model_params(self, index: int, tensor_name: str) -> ModelParams:
        entry = self.models[index]
        values: dict[str, float] = {}
        for key in ("weight", "density", "epsilon"):
            raw = entry.parameters.get(key, self.parameters.get(key))
            if raw is not None:
                values[key] = float(_resolve(raw, tensor_name, f"models[{index}].parameters.{key}", self.source))
        return ModelParams(**values)

    def resolve_path(self, ref: str) -> Path:
        """A model reference: a local folder, relative to the working directory or the recipe."""
        candidates = [Path(ref)]
        if not Path(ref).is_absolute() and self.source != "<recipe>":
            candidates.append(Path(self.source).parent / ref)
        for c in candidates:
            if c.is_dir():
                return c
        raise ConfigError(
            f"{self.source}: model {ref!r} is not a local folder (psomerge reads local checkpoint "
            "folders; download hub models first)"
        )


_FLAGS = frozenset({"normalize", "int8_mask"})


def _rescale(value: Any) -> Rescale:
    """mergekit's rescale is a flag: true is its L1 rescaling, false none."""
    if isinstance(value, bool):
        return "l1" if value else "none"
    return value  # checked against RESCALES when the recipe loaded


def _check_param(key: str, value: ParamValue, where: str) -> None:
    """One parameter's value (each value of a filter list): the type and range its key takes,
    checked when the recipe loads so a bad value is named before any model is read."""
    values = [value]
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, dict) or "value" not in item:
                raise ConfigError(f"{where}: list entries must be {{filter: ..., value: ...}}; "
                                  "gradient lists (per-layer interpolation) are not supported")
        values = [item["value"] for item in value]
    for v in values:
        if key in _FLAGS:
            if _flag(v) is None:
                raise ConfigError(f"{where}: {v!r} is not true or false")
        elif key == "rescale":
            if not isinstance(v, bool) and v not in RESCALES:
                raise ConfigError(f"{where}: {v!r} is not one of {', '.join(RESCALES)}, true (mergekit's: l1) "
                                  "or false (none)")
        else:
            number = _number(v)
            if number is None or not math.isfinite(number):
                raise ConfigError(f"{where}: {v!r} is not a finite number")
            if key == "density" and not 0 <= number <= 1:
                raise ConfigError(f"{where}: {v!r} is not in [0, 1] (the fraction of each task vector kept)")
            if key == "epsilon" and number < 0:
                raise ConfigError(f"{where}: {v!r} is negative")


def _flag(value: Any) -> bool | None:
    """true or false; mergekit-evolve writes flags as 1.0 and 0.0, so 0 and 1 count too."""
    if isinstance(value, bool):
        return value
    number = _number(value)
    return bool(number) if number in (0.0, 1.0) else None


def _number(value: Any) -> float | None:
    """A number, or a string of one: YAML 1.1 reads ``1e-3`` (no dot) as a string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _resolve(value: ParamValue, tensor_name: str, key: str, source: str) -> float | bool | str:
    """A scalar, or the first entry of a filter list whose filter occurs in the tensor name."""
    if isinstance(value, list):
        for item in value:
            if not isinstance(item, dict) or "value" not in item:
                raise ConfigError(
                    f"{source}: {key}: list entries must be {{filter: ..., value: ...}}; "
                    "gradient lists (per-layer interpolation) are not supported"
                )
            if "filter" not in item or item["filter"] in tensor_name:
                return item["value"]
        raise ConfigError(f"{source}: {key}: no filter matches tensor {tensor_name!r} (add a default {{value: ...}})")
    return value
