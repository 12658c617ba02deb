"""Checks that models can be merged, with errors naming the model and tensor at fault."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from psomerge.errors import CheckpointError, IncompatibleModelsError
from psomerge.io.models import Model
from psomerge.io.vocab import AlignedModel

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
                f"if the extra tokens are unused, or set tokenizer_source: base | union (in a recipe; "
                f"basis.tokenizer_source in a run config) to merge over one vocabulary built from the "
                f"models' tokenizers."
            )
        _check_same_token_ids(base, other, base_vocab)
        names = set(other.tensor_names)
        missing = sorted(base_names - names)
        if missing:
            raise IncompatibleModelsError(
                f"model {other.name!r} is missing {len(missing)} tensor(s) that base "
                f"{base.name!r} has: {_listing(missing)}{_tying_hint(base, other)}{_prefix_hint(missing, names)}"
            )
        extra = sorted(names - base_names)
        if extra and _redundant_output_embedding(base, other, extra):
            # some trainers save the tied output embedding anyway; transformers re-ties it on
            # load, so the copy is never used, and the merge reads the base's tensor names only
            log.warning("model %r stores %s although it ties it to its input embedding; ignored",
                        other.name, extra[0])
            extra = []
        if extra:
            raise IncompatibleModelsError(
                f"model {other.name!r} has {len(extra)} tensor(s) that base {base.name!r} lacks: "
                f"{_listing(extra)}{_tying_hint(base, other)}"
            )
        for name in base.tensor_names:
            binfo, oinfo = base.info(name), other.info(name)
            if binfo.shape != oinfo.shape:
                raise IncompatibleModelsError(
                    f"shape mismatch in tensor {name!r}: model {other.name!r} has {list(oinfo.shape)}, "
                    f"base {base.name!r} has {list(binfo.shape)}"
                )
            if binfo.dtype.is_floating_point != oinfo.dtype.is_floating_point:
                # e.g. a quantized weight: merging it as numbers would be silently wrong
                raise IncompatibleModelsError(
                    f"dtype mismatch in tensor {name!r}: model {other.name!r} stores it as {_dtype(oinfo.dtype)}, "
                    f"base {base.name!r} as {_dtype(binfo.dtype)}: a floating-point tensor merges only with "
                    "floating-point tensors (dequantize the model first)"
                )


def _check_same_token_ids(base: Model, other: Model, vocab_size: int | None) -> None:
    """Equal vocabulary sizes, but a token with another id (another tokenizer): the embedding
    rows of the two models mean different tokens, and merging them row by row would be silently
    wrong. Checked where both folders have a tokenizer.json or vocab.json (read as JSON, cheap)."""
    if isinstance(base, AlignedModel) or isinstance(other, AlignedModel):
        return  # already seen through one vocabulary
    ours, theirs = _token_ids(base), _token_ids(other)
    if ours is None or theirs is None:
        return
    # a token only one of them has (a reserved token renamed by a fine-tune) is no mismatch: the row is the same slot
    limit = vocab_size if isinstance(vocab_size, int) else float("inf")
    # untrained placeholders (Llama 3's <|reserved_special_token_N|>, Gemma's <unusedN>) move between
    # tokenizer versions; their rows carry nothing, so only real tokens count
    differ = [t for t, i in theirs.items() if t in ours and ours[t] != i and min(i, ours[t]) < limit
              and not _PLACEHOLDER.search(t)]
    if differ:
        shown = ", ".join(f"{t!r} (id {theirs[t]} vs {ours[t]})" for t in differ[:3])
        raise IncompatibleModelsError(
            f"tokenizer mismatch: model {other.name!r} and base {base.name!r} have the same vocab_size, but "
            f"{len(differ)} token(s) have other ids, e.g. {shown}: their embedding rows mean different tokens. Merge "
            "models fine-tuned from one tokenizer, or set tokenizer_source: base | union (in a recipe; "
            "basis.tokenizer_source in a run config) to align the vocabularies"
        )


_PLACEHOLDER = re.compile(r"reserved|unused", re.IGNORECASE)
_TOKEN_IDS: dict[tuple, dict[str, int] | None] = {}


def _token_ids(model: Model) -> dict[str, int] | None:
    """Token -> id from the model's tokenizer.json (vocabulary and added tokens) or vocab.json;
    None where the folder has neither or they are not in a layout read here (e.g. sentencepiece)."""
    folder = Path(getattr(getattr(model, "base", None), "path", None) or model.path)  # an adapter: its base's
    for fname in ("tokenizer.json", "vocab.json"):
        path = folder / fname
        if path.is_file():
            break
    else:
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _TOKEN_IDS:
        _TOKEN_IDS[key] = _read_token_ids(path)
    return _TOKEN_IDS[key]


def _read_token_ids(path: Path) -> dict[str, int] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # loading the tokenizer (evaluation) names an unreadable file
    if path.name == "vocab.json":
        vocab = data
    else:
        model = data.get("model") if isinstance(data, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, list):  # unigram: [piece, score] pairs, the id is the position
            vocab = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        return None
    ids = dict(vocab)
    for added in (data.get("added_tokens") or []) if path.name == "tokenizer.json" else []:
        if isinstance(added, dict) and isinstance(added.get("content"), str) and isinstance(added.get("id"), int):
            ids[added["content"]] = added["id"]
    return ids


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _prefix_hint(missing: Sequence[str], names: set[str]) -> str:
    """Where the two models name the same tensors with and without a leading module (GPT-2 on
    the hub has ``h.0...``, transformers saves ``transformer.h.0...``), say so."""
    without_head = {n.split(".", 1)[1] for n in names if "." in n}
    if not any(m.split(".", 1)[-1] in names or m in without_head for m in missing):
        return ""
    return (" (they name the same tensors with and without a leading module, such as 'transformer.': the models "
            "were saved in different layouts; load and save them all with one transformers version so they share one)")


def _redundant_output_embedding(base: Model, other: Model, extra: Sequence[str]) -> bool:
    # the expert's config must say it ties: where it does not, a stored lm_head may be trained
    return (len(extra) == 1 and extra[0].endswith("lm_head.weight")
            and base.config.get("tie_word_embeddings", True) is not False
            and other.config.get("tie_word_embeddings") is True)


def _tying_hint(base: Model, other: Model) -> str:
    """Why tensor names differ where one model ties its output embeddings to its input ones."""
    tied, base_tied = other.config.get("tie_word_embeddings"), base.config.get("tie_word_embeddings")
    if tied is None or base_tied is None or bool(tied) == bool(base_tied):
        return ""
    return (f" (model {other.name!r} has tie_word_embeddings={tied}, base {base.name!r} has {base_tied}: one "
            "stores no separate output embedding; save both with the same setting)")


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
