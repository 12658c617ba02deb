"""Particles into a running vLLM engine, three ways, on a Llama-7B-shaped model; and tokens/s.

Per particle: written straight into the engine's weights by its own process (the in-engine
path), summed here into the shared file and reloaded (``reload_weights``), or an engine
restart (the particle written as a checkpoint folder, a new engine started on it). The
in-engine and reloaded weights are compared bit for bit (sha256 of every engine parameter)
and by their answers.

GPU host, one command, no hub: ``.venv/bin/python benchmarks/engine_7b.py``
  builds under $PSOMERGE_HOME/bench/engine-7b (once): a random bf16 base of Llama-2-7B's shape
  (config, a 32000-entry tokenizer and safetensors written here, drawn on the GPU), three
  experts = base + random rank-8 LoRA deltas on every linear layer (adapter folders: three
  dense 7B experts would not fit a 64 GiB disk beside the base; the basis holds them dense),
  the basis (K = 7, DARE p = 0.8 masks); then one engine (memory_fraction 0.35) and the table.
  ``--layers 8`` keeps the width and cuts build and start time; about 4 x 13.5 GB of host RAM
  hold the host-side basis for the shared-file rows.
``--small``: a tiny model (hidden 256, 4 layers, vocab 32000, fp32) that runs end to end on a
  CPU; there the in-engine path needs ``cpu_linear: plain`` (vLLM's CPU backend repacks linear
  weights otherwise), so both engines are measured.
Needs the vLLM environment (``make vllm-env``; on a GPU host ``make vllm-env VLLM_PACKAGE=vllm==...``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from psomerge.generation.vllm_backend import VLLMGenerator  # noqa: E402
from psomerge.io import StreamingSafetensorsWriter  # noqa: E402
from psomerge.io.shared_weights import shared_memory_dir  # noqa: E402
from psomerge.paths import data_dir  # noqa: E402
from psomerge.presets.charlm import SPECIALS, char_tokenizer  # noqa: E402
from psomerge.swarm import BasisSettings, build_basis  # noqa: E402
from psomerge.swarm.fitness import load_particle  # noqa: E402

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32)
SMALL = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA, DELTA_STD = 8, 16, 0.002  # LoRA deltas about a tenth of the weights' spread (0.02)


def tokenizer(vocab: int):
    """A character tokenizer with exactly ``vocab`` entries (CJK and later BMP characters), so
    any id a random model emits decodes."""
    return char_tokenizer("".join(chr(0x4E00 + i) for i in range(vocab - len(SPECIALS))))


def build_family(root: Path, shape: dict, dtype: torch.dtype, experts: int = 3, seed: int = 0) -> tuple[Path, list]:
    """Base (random, drawn on the GPU where there is one) and LoRA experts, written once."""
    from transformers import LlamaConfig, LlamaForCausalLM

    base, adapters = root / "base", [root / f"expert{i}" for i in range(experts)]
    if (root / "BUILT").exists():
        return base, adapters
    shutil.rmtree(root, ignore_errors=True)
    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=0,
                         bos_token_id=1, eos_token_id=2, torch_dtype=str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in LlamaForCausalLM(config).named_parameters()]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device).manual_seed(seed)
    with StreamingSafetensorsWriter(base, [(n, s, dtype) for n, s in names], max_shard_bytes=5 << 30) as writer:
        for name, shape_ in names:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape_, dtype=dtype)
            else:
                tensor = (0.02 * torch.randn(shape_, generator=gen, device=device)).to(dtype).cpu()
            writer.write(name, tensor)
    config.save_pretrained(base)
    tokenizer(shape["vocab_size"]).save_pretrained(base)
    from safetensors.torch import save_file

    b_std = DELTA_STD / ((ALPHA / RANK) * RANK**0.5)  # delta = (alpha / r) B @ A, A ~ N(0, 1)
    for i, folder in enumerate(adapters):
        g = torch.Generator().manual_seed(seed * 1000 + i + 1)
        tensors = {}
        for name, (out, inp) in ((n, s) for n, s in names if n.split(".")[-2] in LINEAR):
            key = "base_model.model." + name.removesuffix(".weight")
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, inp, generator=g).to(dtype)
            tensors[f"{key}.lora_B.weight"] = (b_std * torch.randn(out, RANK, generator=g)).to(dtype)
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(LINEAR),
            "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": str(base)}))
    (root / "BUILT").touch()
    return base, adapters


def prompts(n: int, length: int, vocab: int) -> list[str]:
    rng = np.random.default_rng(7)
    return ["".join(chr(0x4E00 + int(c)) for c in rng.integers(0, vocab - len(SPECIALS), length)) for _ in range(n)]


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms" if seconds < 10 else f"{seconds:,.1f} s"


def measure(basis, args, cpu_linear: str, particles: list, ps: list[str]) -> dict:
    engine = dict(python=args.python, dtype=args.dtype, max_model_len=args.max_model_len,
                  memory_fraction=args.memory_fraction, max_new_tokens=args.new_tokens, stop=(),
                  enforce_eager=not args.cuda_graphs, cpu_linear=cpu_linear)
    t = time.perf_counter()
    gen = VLLMGenerator(basis.model_dir, weight_update="auto", **engine)
    label = f"{gen.device}, {gen.engine_dtype}" + (f", cpu_linear {cpu_linear}" if gen.device == "cpu" else "")
    row = {"engine": label, "device_name": gen.device_name, "path": gen.weight_update, "start": time.perf_counter() - t}
    print(f"  engine ready in {row['start']:.1f} s; weight update {gen.weight_update}: {gen.weight_update_reason}",
          flush=True)
    try:
        if gen.weight_update == "in_engine":
            t = time.perf_counter()
            load_particle(gen, basis, particles[0])  # the engine's process reads the basis, compiles its sum
            row["hold"] = time.perf_counter() - t
            writes = []
            for x in particles:
                t = time.perf_counter()
                load_particle(gen, basis, x)
                writes.append(time.perf_counter() - t)
            row["write"] = statistics.median(writes)
            in_engine = (gen.generate(ps), gen.weights_digest())
            print(f"  basis held by the engine's process in {row['hold']:.1f} s; writes {[ms(w) for w in writes]}",
                  flush=True)
        basis.materialise(particles[0], gen.weights)  # this process reads the basis and compiles its sum
        gen.weights_changed()
        sums, reloads = [], []
        for x in particles:
            t = time.perf_counter()
            basis.materialise(x, gen.weights)
            sums.append(time.perf_counter() - t)
            t = time.perf_counter()
            gen.weights_changed()
            reloads.append(time.perf_counter() - t)
        row["sum"], row["reload"] = statistics.median(sums), statistics.median(reloads)
        if gen.weight_update == "in_engine":
            row["same"] = (gen.generate(ps), gen.weights_digest()) == in_engine
        gen.generate(ps[:4])
        before, t = gen.stats.new_tokens, time.perf_counter()
        gen.generate(ps)
        row["tok_s"] = (gen.stats.new_tokens - before) / (time.perf_counter() - t)
    finally:
        gen.close()
    folder = Path(tempfile.mkdtemp(prefix="psomerge-particle-", dir=shared_memory_dir()))
    try:  # a restart per particle: the particle as a checkpoint, a new engine on it
        t = time.perf_counter()
        basis.write_particle(particles[-1], folder / "model")
        row["restart_write"] = time.perf_counter() - t
        t = time.perf_counter()
        VLLMGenerator(folder / "model", weight_update="shared_file", **engine).close()
        row["restart_start"] = time.perf_counter() - t
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return row


def table(rows: list[dict], title: str) -> str:
    lines = [title, "",
             "| engine | path (auto) | engine start | in-engine write | shared file: sum + reload | "
             "restart: write + start | restart / in-engine | tok/s | in-engine = reload |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        restart = r["restart_write"] + r["restart_start"]
        write, ratio, same = "n/a", "n/a", "n/a"
        if "write" in r:
            write, ratio = ms(r["write"]), f"{restart / r['write']:,.0f}x"
            same = "yes (sha256 and answers)" if r["same"] else "NO"
        lines.append(
            f"| {r['engine']} | {r['path']} | {r['start']:.1f} s | {write} | {ms(r['sum'] + r['reload'])} "
            f"({ms(r['sum'])} + {ms(r['reload'])}) | {ms(restart)} ({ms(r['restart_write'])} + "
            f"{ms(r['restart_start'])}) | {ratio} | {r['tok_s']:,.0f} | {same} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny fp32 model, runs on a CPU")
    parser.add_argument("--layers", type=int, help="transformer blocks (default 32; --small 4)")
    parser.add_argument("--particles", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", help="engine and checkpoint dtype (default bfloat16; --small float32)")
    parser.add_argument("--memory-fraction", type=float, help="vLLM's share of the GPU (of RAM on a CPU)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--cuda-graphs", action="store_true", help="capture CUDA graphs (enforce_eager off)")
    parser.add_argument("--python", help="the vLLM environment's interpreter (default .venv-vllm)")
    args = parser.parse_args()
    shape = dict(SMALL if args.small else LLAMA_7B)
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    args.dtype = args.dtype or ("float32" if args.small else "bfloat16")
    args.memory_fraction = args.memory_fraction or (0.05 if args.small else 0.35)
    name = f"engine-{'small' if args.small else '7b'}-{shape['num_hidden_layers']}l-{args.dtype}"
    root = data_dir() / "bench" / name
    t = time.perf_counter()
    base, experts = build_family(root, shape, getattr(torch, args.dtype))
    basis = build_basis(base, experts, data_dir() / "cache" / "basis", BasisSettings(drop_rate=0.8))
    print(f"{name}: base + {len(experts)} LoRA experts, basis K={basis.k} ready in {time.perf_counter() - t:.1f} s "
          f"(built once under {root})", flush=True)
    rng = np.random.default_rng(0)
    particles = [rng.normal(1 / basis.k, 0.1, (basis.num_groups, basis.k)) for _ in range(args.particles)]
    ps = prompts(args.prompts, 32, shape["vocab_size"])
    rows = []
    for cpu_linear in ("plain", "packed") if args.small else ("packed",):
        print(f"[cpu_linear {cpu_linear}]" if args.small else "[engine]", flush=True)
        rows.append(measure(basis, args, cpu_linear, particles, ps))
    params = sum(basis.members[0].info(n).numel for n in basis.names)
    print("\n" + table(rows, f"{rows[0]['device_name']}: {params / 1e9:.2f}B parameters ({name}), "
                             f"{args.prompts} prompts x {args.new_tokens} new tokens, greedy; per particle, "
                             f"median of {args.particles}"))


if __name__ == "__main__":
    main()
