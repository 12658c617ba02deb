"""A PEFT LoRA adapter folder seen as the full expert it makes of its base model.

Each tensor is formed when asked for, as PEFT's ``merge_and_unload`` forms it: the base
tensor (or the adapter's full copy of it: ``modules_to_save``, a saved ``base_layer``), plus
``scaling * B @ A`` where the adapter targets it, with PEFT's scaling rules (``lora_alpha / r``,
rsLoRA ``lora_alpha / sqrt(r)``, per-module ``rank_pattern`` / ``alpha_pattern``), transposed
for ``fan_in_fan_out`` layers and for embedding LoRA. The view answers like a
``Checkpoint`` (names, infos, ``get``, config and tokenizer files of the base, a fingerprint of
the adapter files and the base), so validation, static merges and the swarm's basis treat it
as any expert. Adapter kinds whose merge is not a plain low-rank sum are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from psomerge.errors import CheckpointError
from psomerge.hashing import digest
from psomerge.io.checkpoint import Checkpoint, TensorInfo, hash_files

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_PREFIX = "base_model.model."

# LoraConfig options whose merge is not base + scaling * B @ A, or that change the base weights
# themselves at initialisation: refused with the option's name.
_UNSUPPORTED_FLAGS = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_qalora": "QALoRA",
    "use_bdlora": "block-diagonal LoRA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "LoRA on nn.Parameter targets",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "megatron_config": "Megatron LoRA layers",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
}
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "mica")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


@dataclass(frozen=True)
class _LowRank:
    a: str  # adapter key of A
    b: str  # adapter key of B
    scaling: float
    transpose: bool  # fan_in_fan_out layers and embeddings store weights as (in, out)
    bias: str | None = None  # lora_B.bias (lora_bias=True): scaling * bias is added to the base bias


# input embeddings that a tied model also uses as its output layer
_INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


class LoraExpert:
    """The expert ``base + LoRA`` of a PEFT adapter folder, formed tensor by tensor."""

    def __init__(self, path: str | Path, base: Checkpoint, name: str | None = None):
        self.path = Path(path)
        self.name = name or str(path)
        self.base = base
        self.config: dict[str, Any] = base.config
        self.format = "lora"
        self.adapter_config = self._read_adapter_config()
        self._file = self._weights_file()
        self._tensors: dict[str, torch.Tensor] | None = None  # the .bin fallback, loaded once
        self._handle: Any = None
        keys = self._keys()
        self._full, self._low_rank = self._plan(keys)
        self._check_shapes()

    # -- reading the adapter ----------------------------------------------------------------
    def _read_adapter_config(self) -> dict[str, Any]:
        cfg_path = self.path / ADAPTER_CONFIG
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"model {self.name!r}: {cfg_path} is not readable JSON ({exc})") from exc
        if not isinstance(cfg, dict):
            raise CheckpointError(f"model {self.name!r}: {cfg_path} is not an adapter config (a JSON object)")
        peft_type = cfg.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise CheckpointError(
                f"model {self.name!r}: adapter peft_type {peft_type!r} is not supported (only LORA adapters)"
            )
        for key, what in _UNSUPPORTED_FLAGS.items():
            if cfg.get(key):
                raise CheckpointError(
                    f"model {self.name!r}: {ADAPTER_CONFIG} sets {key}={cfg[key]!r} ({what}); psomerge merges "
                    "plain LoRA adapters only: merge it with peft's merge_and_unload and use the saved model"
                )
        init = cfg.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
            raise CheckpointError(
                f"model {self.name!r}: {ADAPTER_CONFIG} sets init_lora_weights={init!r}, which changes the base "
                "weights the adapter was trained on; convert it to a plain LoRA adapter first"
            )
        return cfg

    def _weights_file(self) -> Path:
        for fname in ADAPTER_WEIGHTS:
            if (self.path / fname).is_file():
                return self.path / fname
        raise CheckpointError(f"model {self.name!r}: adapter folder {self.path} "
                              f"has none of {', '.join(ADAPTER_WEIGHTS)}")

    def _keys(self) -> list[str]:
        if self._file.suffix == ".safetensors":
            try:
                with safe_open(str(self._file), framework="pt") as f:
                    return list(f.keys())
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"model {self.name!r}: cannot read {self._file.name} ({exc})") from exc
        return list(self._bin())

    def _bin(self) -> dict[str, torch.Tensor]:
        if self._tensors is None:
            try:
                self._tensors = torch.load(self._file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as exc:  # torch raises many types for corrupt files
                raise CheckpointError(f"model {self.name!r}: cannot read {self._file.name} ({exc})") from exc
        return self._tensors

    def _adapter_tensor(self, key: str) -> torch.Tensor:
        if self._file.suffix != ".safetensors":
            return self._bin()[key]
        if self._handle is None:
            self._handle = safe_open(str(self._file), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    # -- what each base tensor becomes ------------------------------------------------------
    def _plan(self, keys: Sequence[str]) -> tuple[dict[str, str], dict[str, _LowRank]]:
        full: dict[str, str] = {}  # base tensor name -> adapter key of its replacement
        pairs: dict[str, dict[str, str]] = {}  # module -> part -> adapter key
        for key in keys:
            inner = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
            if "lora_magnitude_vector" in inner:
                raise CheckpointError(f"model {self.name!r}: adapter tensor {key!r} is DoRA's; DoRA is not supported")
            m = re.fullmatch(r"(.+)\.(lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|lora_embedding_B)",
                             inner)
            if m:
                pairs.setdefault(m.group(1), {})[m.group(2)] = key
                continue
            if ".lora_" in inner:
                raise CheckpointError(f"model {self.name!r}: adapter tensor {key!r} is of an unsupported LoRA kind")
            target = inner.replace(".base_layer.", ".")  # saved base layers of targeted embeddings
            if target not in self.base:
                raise CheckpointError(
                    f"model {self.name!r}: adapter tensor {key!r} replaces {target!r}, which base "
                    f"{self.base.name!r} does not have{self._tied_hint(target)}"
                )
            if ".base_layer." not in inner and self._ties_to_output(target):
                raise CheckpointError(
                    f"model {self.name!r}: adapter tensor {key!r} is a full copy (modules_to_save) of {target!r}, "
                    f"which base {self.base.name!r} ties to its output embedding: peft's merge unties the two (the "
                    "output layer keeps the base embedding), which no merge over the base's tensors can write. Untie "
                    "the base first (save it with tie_word_embeddings=false, so it stores lm_head.weight) and merge "
                    "over that base, or train the embedding with LoRA (target_modules) instead of modules_to_save"
                )
            full[target] = key
        low_rank: dict[str, _LowRank] = {}
        for module, parts in pairs.items():
            if f"{module}.weight" not in self.base:
                raise CheckpointError(
                    f"model {self.name!r}: adapter trains module {module!r}, whose weight base {self.base.name!r} "
                    f"does not have{self._tied_hint(f'{module}.weight')}"
                )
            low_rank[f"{module}.weight"] = self._low_rank_of(module, parts)
        return full, low_rank

    def _base_ties_embeddings(self) -> bool:
        """The base stores one embedding for input and output (transformers' default where the
        config does not say)."""
        return (self.base.config.get("tie_word_embeddings", True) is not False
                and not any(n.endswith("lm_head.weight") for n in self.base.tensor_names))

    def _ties_to_output(self, target: str) -> bool:
        vocab = self.base.config.get("vocab_size")
        return (self._base_ties_embeddings() and target.endswith(_INPUT_EMBEDDINGS)
                and self.base.info(target).shape[:1] == (vocab,))

    def _tied_hint(self, target: str) -> str:
        if not (target.endswith("lm_head.weight") and self._base_ties_embeddings()):
            return ""
        return (" (it ties its output embedding to its input one, tie_word_embeddings; an adapter that trains "
                "or saves lm_head unties them: untie the base first, saved with tie_word_embeddings=false so it "
                "stores lm_head.weight, and merge over that base)")

    def _low_rank_of(self, module: str, parts: dict[str, str]) -> _LowRank:
        cfg = self.adapter_config
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_part, b_part = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        if a_part not in parts or b_part not in parts:
            raise CheckpointError(f"model {self.name!r}: module {module!r} has only one of {a_part}, {b_part}")
        r = _rank(cfg, module)
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        transpose = embedding or bool(cfg.get("fan_in_fan_out"))
        target = f"{module}.weight"
        if target not in self.base:
            raise CheckpointError(
                f"model {self.name!r}: adapter targets {module!r}, but base {self.base.name!r} has no {target!r}"
            )
        bias = parts.get("lora_B.bias")
        if bias is not None and f"{module}.bias" not in self.base:
            raise CheckpointError(f"model {self.name!r}: lora_bias on {module!r}, whose base layer has no bias")
        return _LowRank(parts[a_part], parts[b_part], scaling, transpose, bias)

    def _check_shapes(self) -> None:
        for target, key in self._full.items():
            shape = tuple(self._adapter_shape(key))
            if shape != self.base.info(target).shape:
                raise CheckpointError(
                    f"model {self.name!r}: adapter tensor {key!r} has shape {list(shape)}, base tensor {target!r} "
                    f"has {list(self.base.info(target).shape)}"
                )
        for target, lr in self._low_rank.items():
            a, b = self._adapter_shape(lr.a), self._adapter_shape(lr.b)
            r_expected = _rank(self.adapter_config, target[: -len(".weight")])
            if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] != r_expected:
                raise CheckpointError(
                    f"model {self.name!r}: LoRA factors of {target!r} have shapes {list(b)} @ {list(a)}, "
                    f"not (out, r) @ (r, in) with r = {r_expected} from {ADAPTER_CONFIG}"
                )
            shape = (a[1], b[0]) if lr.transpose else (b[0], a[1])
            if shape != self.base.info(target).shape:
                raise CheckpointError(
                    f"model {self.name!r}: LoRA delta of {target!r} has shape {list(shape)}, base has "
                    f"{list(self.base.info(target).shape)} (fan_in_fan_out={self.adapter_config.get('fan_in_fan_out')})"
                )

    def _adapter_shape(self, key: str) -> list[int]:
        if self._file.suffix == ".safetensors":
            if self._handle is None:
                self._handle = safe_open(str(self._file), framework="pt", device="cpu")
            return list(self._handle.get_slice(key).get_shape())
        return list(self._bin()[key].shape)

    # -- the Checkpoint interface -------------------------------------------------------------
    @property
    def tensor_names(self) -> list[str]:
        return self.base.tensor_names

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def get(self, name: str) -> torch.Tensor:
        """The expert's tensor, as ``merge_and_unload`` leaves it: in the base tensor's dtype,
        the fp32 delta added in place (one rounding)."""
        bias_of = self._bias_targets()
        key = self._full.get(name)
        tensor = self._adapter_tensor(key).to(self.base.info(name).dtype) if key else self.base.get(name)
        lr = self._low_rank.get(name)
        if lr is None and name not in bias_of:
            return tensor
        out = tensor.clone()
        if lr is not None:
            out += self.delta(name)
        if name in bias_of:
            lr_w = self._low_rank[bias_of[name]]
            out += self._adapter_tensor(lr_w.bias).float() * lr_w.scaling
        return out

    def delta(self, name: str) -> torch.Tensor:
        """scaling * B @ A for a targeted weight, fp32, in the base tensor's layout."""
        lr = self._low_rank[name]
        product = self._adapter_tensor(lr.b).float() @ self._adapter_tensor(lr.a).float()
        return (product.T if lr.transpose else product) * lr.scaling

    def _bias_targets(self) -> dict[str, str]:
        return {t[: -len(".weight")] + ".bias": t for t, lr in self._low_rank.items() if lr.bias}

    @property
    def targets(self) -> list[str]:
        """Base tensors the adapter changes."""
        return sorted({*self._full, *self._low_rank, *self._bias_targets()})

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    def adapter_files(self) -> list[Path]:
        return [self.path / ADAPTER_CONFIG, self._file]

    def weight_files(self) -> list[Path]:
        return [*self.adapter_files(), *self.base.weight_files()]

    def fingerprint(self) -> str:
        """The adapter files' content and the base's fingerprint."""
        return digest(["lora", hash_files(self.adapter_files()), self.base.fingerprint()], 32)

    def write_model_files(self, out_dir: str | Path, dtype: torch.dtype) -> None:
        self.base.write_model_files(out_dir, dtype)

    def close(self) -> None:
        self._handle = None
        self._tensors = None

    def __enter__(self) -> "LoraExpert":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LoraExpert({self.name!r}, {len(self.targets)} tensors changed, base {self.base.name!r})"


def _pattern_value(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key`` lookup: the value of the first pattern matching the end of
    the module name, else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _rank(cfg: dict[str, Any], module: str) -> int:
    return int(_pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", 8)))
