"""Generation backends, side by side on the same prompts and the same weights.

For each model size and dtype:
- transformers: batched greedy ``generate`` on one resident model (tokens/s);
- vLLM: engine start (once), pushing a particle into the running engine (materialise into
  the shared file + in-place reload), and tokens/s on the same prompts.
A particle push replaces what would otherwise be an engine restart per particle, so the
two are printed together.

Usage: .venv/bin/python benchmarks/generation.py [--sizes demo,57m,smollm2] [--reps 3]
(smollm2: SmolLM2-135M-Instruct and the preset's experts, after `psomerge demo --preset smollm2`)
Needs the vLLM environment (`make vllm-env`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psomerge.presets.charlm import char_tokenizer  # noqa: E402
from psomerge.presets.synthetic import llama_config, make_family  # noqa: E402
from psomerge.presets.tiny_tasks import ALPHABET, DEMO_TASKS, unique_examples  # noqa: E402
from psomerge.io import Checkpoint  # noqa: E402
from psomerge.paths import data_dir  # noqa: E402
from psomerge.swarm import BasisSettings, build_basis  # noqa: E402

SIZES = {  # hidden, layers, heads, intermediate
    "demo": (128, 4, 4, 256),
    "57m": (768, 8, 12, 2048),
}
NEW_TOKENS = 32
PROMPTS = 64


def family(size: str) -> tuple[Path, list[Path]]:
    if size == "smollm2":  # the real model: the preset's base and experts
        root = data_dir() / "smollm2" / "current"
        if not (root / "BUILT").exists():
            sys.exit(f"{root} not built: run `psomerge demo --preset smollm2` first")
        return root / "base", [root / "experts" / "sentiment", root / "experts" / "iso_code"]
    root = data_dir() / "bench" / f"generation-{size}"
    tok = char_tokenizer(ALPHABET)
    if not (root / "expert1" / "tokenizer.json").exists():
        hidden, layers, heads, inter = SIZES[size]
        cfg = llama_config(hidden=hidden, layers=layers, vocab=len(tok), intermediate=inter, heads=heads)
        cfg.num_key_value_heads = heads
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        base, experts = make_family(root, 2, cfg, noise=0.02)
        for path in (base, *experts):
            tok.save_pretrained(path)
    return root / "base", [root / f"expert{i}" for i in range(2)]


def prompts() -> list[str]:
    out = []
    for task in DEMO_TASKS:
        out += [q for q, _ in unique_examples(task.hard, PROMPTS // len(DEMO_TASKS) + 1, seed=3)]
    return out[:PROMPTS]


def timed(fn, reps: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(reps):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result


def bench_transformers(base: Path, dtype: torch.dtype, ps: list[str], reps: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from psomerge.generation.transformers_backend import TransformersGenerator

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    gen = TransformersGenerator(model, AutoTokenizer.from_pretrained(base), batch_size=PROMPTS,
                                max_new_tokens=NEW_TOKENS, stop=())
    gen.generate(ps[:4])  # warm-up
    before = gen.stats.new_tokens
    seconds, _ = timed(lambda: gen.generate(ps), reps)
    tokens = (gen.stats.new_tokens - before) / reps
    return {"tok_s": tokens / seconds, "gen_s": seconds}


def bench_vllm(base: Path, experts: list[Path], dtype: str, ps: list[str], reps: int) -> dict:
    from psomerge.generation.vllm_backend import VLLMGenerator

    basis = build_basis(base, experts, data_dir() / "cache" / "basis", BasisSettings())
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    gen = VLLMGenerator(base, max_new_tokens=NEW_TOKENS, stop=(), dtype=dtype, max_model_len=128)
    start = time.perf_counter() - t
    try:
        weights = gen.weights
        basis.materialise(rng.normal(0.3, 0.3, (1, basis.k)), weights)  # warm-up (kernel compile)
        gen.weights_changed()
        mats, reloads = [], []
        for _ in range(max(reps, 5)):
            x = rng.normal(0.3, 0.3, (1, basis.k))
            t = time.perf_counter()
            basis.materialise(x, weights)
            mats.append(time.perf_counter() - t)
            t = time.perf_counter()
            gen.weights_changed()
            reloads.append(time.perf_counter() - t)
        gen.generate(ps[:4])
        before = gen.stats.new_tokens
        seconds, _ = timed(lambda: gen.generate(ps), reps)
        tokens = (gen.stats.new_tokens - before) / reps
        return {"start_s": start, "materialise_s": statistics.median(mats), "reload_s": statistics.median(reloads),
                "tok_s": tokens / seconds, "gen_s": seconds, "device": gen.device}
    finally:
        gen.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="demo,57m")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    ps = prompts()
    print(f"{PROMPTS} prompts x {NEW_TOKENS} new tokens, greedy, torch threads={torch.get_num_threads()}")
    for size in args.sizes.split(","):
        base, experts = family(size)
        ck = Checkpoint(base)
        params = sum(int(np.prod(ck.info(n).shape)) for n in ck.tensor_names)
        print(f"\n[{size}] {params / 1e6:.1f}M parameters, basis K=5", flush=True)
        for dtype_name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            tf = bench_transformers(base, dtype, ps, args.reps)
            vl = bench_vllm(base, experts, dtype_name, ps, args.reps)
            push = vl["materialise_s"] + vl["reload_s"]
            print(f"  {dtype_name:8}  transformers {tf['tok_s']:8.0f} tok/s"
                  f" | vLLM ({vl['device']}) {vl['tok_s']:8.0f} tok/s"
                  f" | vLLM engine start {vl['start_s']:6.2f} s vs particle push {push * 1e3:7.1f} ms"
                  f" (materialise {vl['materialise_s'] * 1e3:.1f} + reload {vl['reload_s'] * 1e3:.1f})"
                  f" = {vl['start_s'] / push:,.0f}x", flush=True)


if __name__ == "__main__":
    main()
