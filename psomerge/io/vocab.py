"""Models whose tokenizers differ, seen with one shared vocabulary (mergekit's ``tokenizer_source``).

``base``: the output vocabulary is the base's; rows of tokens only an expert has are dropped
(with a warning naming them). ``union``: the base tokenizer plus every token of the experts,
added as mergekit 0.1.5's ``build_union_tokenizer`` adds them (experts in order; within a
model, plain vocabulary tokens by id, then added tokens by id). Every model is then a view
whose vocabulary-indexed tensors (input and output embeddings) have one row per output
token: its own row where it has the token, else the row mergekit fills in
(``PermutedVocabulary``): the base's row where the base has the token, else the row of the
only model that has it, else the mean of the rows of the models that have it. Other tensors
pass through. Merging and the swarm see aligned tensors and never know.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from psomerge.errors import IncompatibleModelsError
from psomerge.hashing import digest
from psomerge.io.checkpoint import TensorInfo
from psomerge.io.model_files import TOKENIZER_FILES

log = logging.getLogger(__name__)

TokenizerSource = Literal["base", "union"]
TOKENIZER_SOURCES = ("base", "union")
_MAX_LISTED = 10


@dataclass
class VocabularyPlan:
    """The output tokenizer and, per model, where each output row comes from."""

    source: TokenizerSource
    tokenizer: Any  # transformers tokenizer of the output
    size: int
    models: list  # the models, base (or reference) first
    rows: list[torch.Tensor]  # per model: its row for each output id, -1 where it lacks the token
    tensor_names: list[str]  # the vocabulary-indexed tensors
    base_rule: bool  # a token the base has takes the base's row in models lacking it
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            vocab = sorted(self.tokenizer.get_vocab().items(), key=lambda kv: kv[1])
            self._fingerprint = digest([self.source, vocab, [r.tolist() for r in self.rows], self.base_rule], 16)
        return self._fingerprint

    def fill_row(self, name: str, token_id: int, cache: dict) -> torch.Tensor:
        """The row a model lacking output token ``token_id`` gets for tensor ``name`` (fp32)."""
        have = [m for m, r in enumerate(self.rows) if r[token_id] >= 0]
        if not have:
            return torch.zeros(self._tensor(name, 0, cache).shape[1:], dtype=torch.float32)
        if len(have) == 1:
            return self._row(name, have[0], token_id, cache)
        if self.base_rule and 0 in have:
            return self._row(name, 0, token_id, cache)
        # mergekit's order: the merged models as listed, the base last
        ordered = [m for m in have if m != 0] + [m for m in have if m == 0]
        total = torch.zeros(self._tensor(name, ordered[0], cache).shape[1:], dtype=torch.float32)
        for m in ordered:
            total = total + self._row(name, m, token_id, cache)
        total /= len(ordered)
        return total

    def _row(self, name: str, model: int, token_id: int, cache: dict) -> torch.Tensor:
        return self._tensor(name, model, cache)[int(self.rows[model][token_id])].float()

    def _tensor(self, name: str, model: int, cache: dict) -> torch.Tensor:
        if model not in cache:
            cache[model] = self.models[model].get(name)
        return cache[model]


class AlignedModel:
    """Model ``index`` of a plan, its vocabulary tensors re-indexed to the output vocabulary."""

    def __init__(self, plan: VocabularyPlan, index: int):
        self.plan = plan
        self.index = index
        self.inner = plan.models[index]
        self.name = self.inner.name
        self.path = self.inner.path
        self.format = self.inner.format
        self.config = {**self.inner.config, "vocab_size": plan.size}

    @property
    def tensor_names(self) -> list[str]:
        return self.inner.tensor_names

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        if name in self.plan.tensor_names:
            return TensorInfo(name, (self.plan.size, *info.shape[1:]), info.dtype, info.file)
        return info

    def __contains__(self, name: str) -> bool:
        return name in self.inner

    def get(self, name: str) -> torch.Tensor:
        """Vocabulary tensors aligned (fp32: filled rows may be means); others as stored."""
        if name not in self.plan.tensor_names:
            return self.inner.get(name)
        own = self.inner.get(name)
        rows = self.plan.rows[self.index]
        out = torch.empty((self.plan.size, *own.shape[1:]), dtype=torch.float32)
        have = rows >= 0
        out[have] = own[rows[have]].float()
        cache = {self.index: own}
        for token_id in torch.nonzero(~have).reshape(-1).tolist():
            out[token_id] = self.plan.fill_row(name, token_id, cache)
        return out

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def num_parameters(self) -> int:
        return sum(self.info(n).numel for n in self.tensor_names)

    def weight_files(self) -> list[Path]:
        return self.inner.weight_files()

    def fingerprint(self) -> str:
        return digest(["vocab", self.inner.fingerprint(), self.plan.fingerprint(), self.index], 32)

    def write_model_files(self, out_dir: str | Path, dtype: torch.dtype) -> None:
        """The model's config with the output vocabulary size, and the output tokenizer."""
        out_dir = Path(out_dir)
        self.inner.write_model_files(out_dir, dtype)
        for fname in TOKENIZER_FILES:
            (out_dir / fname).unlink(missing_ok=True)
        self.plan.tokenizer.save_pretrained(out_dir)
        config = json.loads((out_dir / "config.json").read_text())
        config["vocab_size"] = self.plan.size
        (out_dir / "config.json").write_text(json.dumps(config, indent=2))

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> "AlignedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"AlignedModel({self.name!r}, vocab {self.plan.size}, {self.plan.source})"


def align_vocabularies(reference, others: Sequence, source: TokenizerSource | None, *, base_rule: bool = True):
    """``reference`` and ``others`` with one vocabulary chosen by ``source``.

    Without a source, or where every model has the reference's tokenizer and vocabulary
    size, the models come back unchanged (validation then names any mismatch). ``base_rule``:
    the reference is a base model (not the first model of a linear merge)."""
    if source is None:
        return reference, list(others)
    if source not in TOKENIZER_SOURCES:
        raise ValueError(f"tokenizer_source {source!r} is not one of {TOKENIZER_SOURCES}")
    models = [reference, *others]
    tokenizers = [_load_tokenizer(m) for m in models]
    vocabs = [_used_vocab(t, m) for t, m in zip(tokenizers, models)]
    if all(v == vocabs[0] for v in vocabs) and all(m.config.get("vocab_size") == reference.config.get("vocab_size")
                                                    for m in models):
        return reference, list(others)
    out_tok = tokenizers[0] if source == "base" else _union_tokenizer(models, tokenizers, vocabs)
    out_vocab = out_tok.get_vocab()
    size = len(out_vocab)
    rows = []
    for m, vocab in zip(models, vocabs):
        r = torch.full((size,), -1, dtype=torch.long)
        for tok, new_id in out_vocab.items():
            if tok in vocab:
                r[new_id] = vocab[tok]
        rows.append(r)
        dropped = sorted((t for t in vocab if t not in out_vocab), key=vocab.get)
        if dropped:
            shown = ", ".join(repr(t) for t in dropped[:_MAX_LISTED])
            more = f" and {len(dropped) - _MAX_LISTED} more" if len(dropped) > _MAX_LISTED else ""
            log.warning("tokenizer_source %s: model %r loses %d token row(s) the output vocabulary lacks: %s%s",
                        source, m.name, len(dropped), shown, more)
    names = _vocabulary_tensors(reference, size_by_model=[m.config.get("vocab_size") for m in models], models=models)
    plan = VocabularyPlan(source, out_tok, size, models, rows, names, base_rule)
    log.info("vocabulary %s: %d tokens; aligning %s", source, size, ", ".join(names))
    return AlignedModel(plan, 0), [AlignedModel(plan, i) for i in range(1, len(models))]


def _load_tokenizer(model):
    from transformers import AutoTokenizer

    folder = getattr(model, "base", model).path  # a LoRA expert uses its base's tokenizer
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise IncompatibleModelsError(
            f"model {model.name!r}: no tokenizer loadable from {folder} ({exc}); tokenizer_source needs each "
            "model's tokenizer"
        ) from exc


def _used_vocab(tokenizer, model) -> dict[str, int]:
    """Token -> id for the ids the model has rows for (mergekit strips the others)."""
    size = model.config.get("vocab_size") or len(tokenizer)
    return {tok: i for tok, i in tokenizer.get_vocab().items() if i < size}


def _union_tokenizer(models, tokenizers, vocabs):
    """mergekit 0.1.5's union: a copy of the base tokenizer, then each model's plain tokens
    it lacks, then every model's added tokens (first settings win), in a fixed order."""
    import tempfile

    from transformers import AutoTokenizer

    plain: dict[str, None] = {}  # an ordered set
    added: dict[str, Any] = {}
    for tok_obj, vocab in zip(tokenizers, vocabs):
        decoder = tok_obj.added_tokens_decoder
        added_contents = {info.content for info in decoder.values()}
        for tok, _ in sorted(vocab.items(), key=lambda kv: kv[1]):
            if tok not in added_contents:
                plain.setdefault(tok)
        used_ids = set(vocab.values())
        for idx in sorted(decoder):
            if idx in used_ids:
                added.setdefault(decoder[idx].content, decoder[idx])
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the base's own tokenizer stays as it is
        tokenizers[0].save_pretrained(tmp)
        union = AutoTokenizer.from_pretrained(tmp)
    base_vocab = tokenizers[0].get_vocab()
    for tok in plain:
        if tok not in added and tok not in base_vocab:
            union.add_tokens(tok)
    for info in added.values():
        union.add_tokens(info)
    return union


def _vocabulary_tensors(reference, size_by_model: list, models: Sequence) -> list[str]:
    """Names of the input and output embedding tensors, found by building the architecture
    on the meta device (no memory) and asking transformers for its embeddings."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = getattr(reference, "base", reference).path
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise IncompatibleModelsError(
            f"model {reference.name!r}: cannot tell its embedding tensors ({exc}); tokenizer_source needs an "
            "architecture transformers knows"
        ) from exc
    weights = [e.weight for e in (model.get_input_embeddings(), model.get_output_embeddings()) if e is not None]
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if any(p is w for w in weights)]
    names = [n for n in names if n in reference]
    for m, size in zip(models, size_by_model):
        for n in names:
            if n in m and m.info(n).shape[0] != size:
                raise IncompatibleModelsError(
                    f"model {m.name!r}: tensor {n!r} has {m.info(n).shape[0]} rows, its config says "
                    f"vocab_size={size}"
                )
    return names
