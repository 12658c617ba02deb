"""Checks that models can be merged, with errors naming the model and tensor at fault."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from psomerge.errors import CheckpointError, IncompatibleModelsError
from psomerge.io.models import Model

log = logging.getLogger(__name__)

_MAX_LISTED = 5


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _architecture(ckpt: Model) -> tuple[str | None, tuple[str, ...]]:
    return ckpt.config.get("model_type"), tuple(ckpt.config.get("architectures") or ())


def check_compatible(base: Model, others: Sequence[Model]) -> None:
    """Raise IncompatibleModelsError unless every model in ``others`` matches ``base``
    in architecture, vocabulary, tensor names and tensor shapes."""
    base_arch = _architecture(base)
    base_vocab = base.config.get("vocab_size")
    base_names = set(base.tensor_names)
    for other in others:
        arch = _architecture(other)
        if arch != base_arch:
            raise IncompatibleModelsError(
                f"model {other.name!r} is {arch[0]} {list(arch[1])}, but base {base.name!r} is "
                f"{base_arch[0]} {list(base_arch[1])}: only models of one architecture can be merged"
            )
        vocab = other.config.get("vocab_size")
        if vocab != base_vocab:
            raise IncompatibleModelsError(
                f"vocabulary size mismatch: model {other.name!r} has vocab_size={vocab}, base "
                f"{base.name!r} has vocab_size={base_vocab}. Merging needs one shared tokenizer: "
                f"fine-tune the experts from the base with its tokenizer, or resize the expert's "
                f"embeddings to the base vocabulary (model.resize_token_embeddings({base_vocab})) "
                f"if the extra tokens are unused."
            )
        names = set(other.tensor_names)
        missing = sorted(base_names - names)
        if missing:
            raise IncompatibleModelsError(
                f"model {other.name!r} is missing {len(missing)} tensor(s) that base "
                f"{base.name!r} has: {_listing(missing)}"
            )
        extra = sorted(names - base_names)
        if extra:
            raise IncompatibleModelsError(
                f"model {other.name!r} has {len(extra)} tensor(s) that base {base.name!r} lacks: "
                f"{_listing(extra)}"
            )
        for name in base.tensor_names:
            bshape, oshape = base.info(name).shape, other.info(name).shape
            if bshape != oshape:
                raise IncompatibleModelsError(
                    f"shape mismatch in tensor {name!r}: model {other.name!r} has {list(oshape)}, "
                    f"base {base.name!r} has {list(bshape)}"
                )


def check_finite(tensor: torch.Tensor, model: str, tensor_name: str) -> None:
    """Raise CheckpointError if a floating-point tensor holds NaN or inf."""
    if not tensor.is_floating_point() or bool(torch.isfinite(tensor.sum())):
        return  # NaN and inf survive a sum: one pass, no mask (several times faster)
    if not bool(torch.isfinite(tensor).all()):  # else the sum merely overflowed
        n_nan = int(torch.isnan(tensor).sum())
        n_inf = int(torch.isinf(tensor).sum())
        raise CheckpointError(
            f"model {model!r}: tensor {tensor_name!r} holds non-finite weights "
            f"({n_nan} NaN, {n_inf} inf); the checkpoint is corrupt or diverged"
        )


_WEIGHT_VERDICTS: dict[tuple[str, ...], list[str]] = {}


def check_weights(base: Model, others: Sequence[Model]) -> list[str]:
    """Read every floating tensor of ``base`` and ``others`` once: raise CheckpointError at the
    first NaN or inf (naming model and tensor), and warn about each model whose weights equal
    the base's (it differs from the base at most in config or tokenizer, so merging it adds
    nothing). Returns the names of those models. Remembered per process by content hash."""
    key = (base.fingerprint(), *(o.fingerprint() for o in others))
    if key not in _WEIGHT_VERDICTS:
        same = [True] * len(others)
        for name in base.tensor_names:
            b = base.get(name)
            if not b.is_floating_point():
                continue
            check_finite(b, base.name, name)
            for i, other in enumerate(others):
                t = other.get(name)
                check_finite(t, other.name, name)
                same[i] = same[i] and t.dtype == b.dtype and torch.equal(t, b)
        _WEIGHT_VERDICTS[key] = [i for i, s in enumerate(same) if s]
    identical = [others[i].name for i in _WEIGHT_VERDICTS[key]]
    for name in identical:
        log.warning("model %r has the same weights as base %r: it differs from the base at most in config or "
                    "tokenizer files, so merging it changes nothing; check that it is the expert you meant",
                    name, base.name)
    return identical
