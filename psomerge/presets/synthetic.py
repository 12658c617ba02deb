"""Synthetic model families (a random base plus perturbed 'experts') for tests and benchmarks.

They carry no skill; they exercise I/O, merge maths and memory at any size without a hub.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama_config(
    hidden: int = 32, layers: int = 2, vocab: int = 64, intermediate: int | None = None, heads: int = 4
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )


def make_family(
    root: str | Path,
    n_experts: int = 3,
    config: LlamaConfig | None = None,
    noise: float = 0.01,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> tuple[Path, list[Path]]:
    """Write ``root/base`` and ``root/expert{i}``; experts = base + noise * N(0, 1) per tensor."""
    root = Path(root)
    torch.manual_seed(seed)
    config = config or llama_config()
    with torch.device("cpu"):
        base = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    base.save_pretrained(root / "base", **kwargs)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    paths = []
    for i in range(n_experts):
        gen = torch.Generator().manual_seed(seed * 1000 + i + 1)
        with torch.no_grad():
            for name, param in base.state_dict().items():
                param.copy_(state[name] + noise * torch.randn(param.shape, generator=gen).to(dtype))
        path = root / f"expert{i}"
        base.save_pretrained(path, **kwargs)
        paths.append(path)
    with torch.no_grad():
        for name, param in base.state_dict().items():
            param.copy_(state[name])
    return root / "base", paths
