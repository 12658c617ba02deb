"""The transformers backend: batched greedy decoding on one resident causal LM.

The swarm overwrites the model's weights in place between particles, so a generator is
built once per worker and reused for every particle.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from psomerge.generation.protocol import Continuation, GenerationStats, cut_at_stop, encode_continuations
from psomerge.generation.settings import TransformersSettings

_DEFAULT = TransformersSettings()  # one default per setting: the run config's


class TransformersGenerator:
    """Greedy, batched generation with a transformers causal LM kept resident."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = _DEFAULT.batch_size,
        max_new_tokens: int = _DEFAULT.max_new_tokens,
        stop: Sequence[str] = tuple(_DEFAULT.stop),
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.stats = GenerationStats()
        tokenizer.padding_side = "left"  # decoder-only: new tokens follow the prompt directly
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

    @property
    def weights(self) -> torch.nn.Module:
        return self.model

    def weights_changed(self) -> None:
        """Nothing to do: the swarm wrote into this very model's parameters."""

    def close(self) -> None:
        pass

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], *, stop: Sequence[str] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        stop = self.stop if stop is None else tuple(stop)
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        out: list[str] = []
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start : start + self.batch_size])
            enc = self.tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=True).to(device)
            gen = self.model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )
            new = gen[:, enc["input_ids"].shape[1]:]
            self.stats.new_tokens += int((new != self.tokenizer.pad_token_id).sum())
            for text in self.tokenizer.batch_decode(new, skip_special_tokens=True):
                out.append(cut_at_stop(text, stop))
        self.stats.calls += 1
        self.stats.prompts += len(prompts)
        return out

    @torch.inference_mode()
    def loglikelihood(self, requests: Sequence[tuple[str, str]], append_eos: bool = False) -> list[Continuation]:
        """One forward pass per batch. Sequences are left-padded so every continuation ends at
        the last position and only its logits are computed (``logits_to_keep``)."""
        encoded = encode_continuations(self.tokenizer, requests, append_eos)
        device = next(self.model.parameters()).device
        pad = self.tokenizer.pad_token_id
        out: list[Continuation] = []
        for start in range(0, len(encoded), self.batch_size):
            batch = encoded[start: start + self.batch_size]
            seqs = [ctx + cont for ctx, cont in batch]
            width = max(map(len, seqs))
            keep = max(len(cont) for _, cont in batch) + 1
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                logits_to_keep=keep).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            for row, (_, cont) in enumerate(batch):
                n = len(cont)
                if n == 0:
                    out.append(Continuation(0.0, 0, 0))
                    continue
                # logits at position t predict token t + 1: the continuation's n tokens are
                # predicted by the n positions before the last one kept
                pred = logprobs[row, keep - 1 - n: keep - 1]
                target = torch.tensor(cont, device=device)
                chosen = pred.gather(-1, target[:, None]).squeeze(-1)
                out.append(Continuation(float(chosen.sum()), n, int((pred.argmax(-1) == target).sum())))
        return out
