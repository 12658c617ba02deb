"""The memory plan: what goes where on a GPU host, from safetensors headers alone, and a clear
refusal when a run does not fit. 7B-shaped checkpoints are header-only sparse files."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from psomerge.config import RunConfig
from psomerge.errors import ConfigError
from psomerge.io.layout import plan_file
from psomerge.swarm import BasisSettings, build_basis
from psomerge.swarm.plan import GPU, HOST, PAGE_CACHE, Allocation, MemoryPlanError, gib, parse_size, plan_memory

ROOT = Path(__file__).resolve().parents[1]
GiB = 1024**3
LLAMA_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32}


def llama_tensors(c, dtype):
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    out = [("model.embed_tokens.weight", (v, h), dtype)]
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + f"self_attn.{x}_proj.weight", (h, h), dtype) for x in "qkvo"]
        out += [(p + "mlp.gate_proj.weight", (i, h), dtype), (p + "mlp.up_proj.weight", (i, h), dtype),
                (p + "mlp.down_proj.weight", (h, i), dtype), (p + "input_layernorm.weight", (h,), dtype),
                (p + "post_attention_layernorm.weight", (h,), dtype)]
    return out + [("model.norm.weight", (h,), dtype), ("lm_head.weight", (v, h), dtype)]


def header_only_checkpoint(folder: Path, config: dict, dtype=torch.bfloat16) -> Path:
    """A checkpoint folder whose safetensors file has a real header and a sparse, never-written
    data section of the right size."""
    folder.mkdir(parents=True)
    layout = plan_file(llama_tensors(config, dtype))
    with open(folder / "model.safetensors", "wb") as f:
        f.write(layout.prefix)
        f.truncate(layout.size)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "torch_dtype": "bfloat16", **config}))
    return folder


@pytest.fixture(scope="module")
def llama7b(tmp_path_factory):
    """Base + 3 bf16 7B-shaped experts, and configs/llama-7b.yaml pointed at them."""
    root = tmp_path_factory.mktemp("llama7b")
    models = [header_only_checkpoint(root / name, LLAMA_7B) for name in ("base", "e0", "e1", "e2")]
    assert all(os.stat(m / "model.safetensors").st_blocks * 512 < 2**20 for m in models)  # nothing big written
    config = yaml.safe_load((ROOT / "configs" / "llama-7b.yaml").read_text())
    config.update(base=str(models[0]), experts=[str(m) for m in models[1:]])
    numel = sum(torch.Size(shape).numel() for _, shape, _ in llama_tensors(LLAMA_7B, None))
    masks = sum((torch.Size(shape).numel() + 7) // 8 for _, shape, _ in llama_tensors(LLAMA_7B, None))
    return root, config, numel, masks


def make_config(llama7b, **sections):
    root, config, _, _ = llama7b
    data = {**config, **sections}
    return RunConfig.from_dict(data, check_paths=False)


def plan_of(cfg, gpu="80GiB", host=None):
    return plan_memory(cfg.base, cfg.experts, cfg.basis, cfg.generation, parse_size(gpu),
                       parse_size(host) if host else None)


def by_what(plan, prefix):
    (hit,) = [a for a in plan.allocations if a.what.startswith(prefix)]
    return hit


def test_the_7b_config_fits_an_80gib_gpu(llama7b):
    """weight_update auto plans the in-engine path: the engine's process holds the members; with
    memory_fraction 0.85 of 80 GiB they do not fit beside the engine, so they are pinned on the host."""
    _, _, numel, masks = llama7b
    start = time.perf_counter()
    cfg = make_config(llama7b)
    assert cfg.generation.vllm.weight_update == "auto"
    plan = plan_of(cfg)
    assert time.perf_counter() - start < 10  # headers only: hashing or reading 54 GB would take minutes
    assert by_what(plan, "basis members") == Allocation(
        HOST, "basis members: base + 3 experts (dense, bfloat16) in the vLLM engine's process", 4 * 2 * numel)
    assert by_what(plan, "DARE masks").nbytes == 3 * masks and by_what(plan, "DARE masks").where == HOST
    engine_weights = by_what(plan, "vLLM engine weights")
    assert engine_weights.where == GPU and engine_weights.nbytes == 2 * numel
    assert by_what(plan, "vLLM KV cache").nbytes == int(0.85 * 80 * GiB) - 2 * numel
    scratch = by_what(plan, "sum temporaries")
    assert scratch.where == GPU and scratch.nbytes == 4 * 32000 * 4096 + 6 * 2**24 * 4 + 2**24
    assert plan.used(GPU) == int(0.85 * 80 * GiB) + scratch.nbytes
    # particles never go through the shared file, checkpoints (baselines, the gate's champion) still do
    assert by_what(plan, "shared weight file") == Allocation(
        HOST, "shared weight file in /dev/shm (bfloat16) the engine reloads from (checkpoints only: baselines, the "
              "gate's champion)", 2 * numel)
    assert not [a for a in plan.allocations if "fp32 scratch" in a.what]
    assert plan.members_on.startswith("pinned host memory of the vLLM engine's process")
    assert any("memory_fraction <= 0.33 (now 0.85) would leave the members (52.56 GiB) room" in n for n in plan.notes)
    assert plan.problems() == []
    plan.check()
    roomy = make_config(llama7b, generation={**llama7b[1]["generation"], "vllm": {
        **llama7b[1]["generation"]["vllm"], "memory_fraction": 0.33}})
    on_gpu = plan_of(roomy)
    assert by_what(on_gpu, "basis members").where == GPU and on_gpu.members_on.startswith("GPU, in the vLLM engine")
    assert on_gpu.problems() == [] and on_gpu.used(HOST) == 2 * numel  # the shared file alone


def test_the_7b_config_through_the_shared_file(llama7b):
    _, config, numel, masks = llama7b
    plan = plan_of(make_config(llama7b, generation={**config["generation"], "vllm": {
        **config["generation"]["vllm"], "weight_update": "shared_file"}}))
    assert by_what(plan, "basis members") == Allocation(PAGE_CACHE, "basis members: base + 3 experts (dense, bfloat16)",
                                              4 * 2 * numel)
    assert by_what(plan, "DARE masks").nbytes == 3 * masks
    assert plan.used(GPU) == int(0.85 * 80 * GiB)  # weights + KV cache fill the engine's fraction
    assert by_what(plan, "vLLM KV cache").nbytes == int(0.85 * 80 * GiB) - 2 * numel
    assert by_what(plan, "shared weight file").where == HOST
    assert plan.problems() == [] and "page cache" in plan.members_on
    plan.check()


def test_members_in_ram_on_a_small_host_are_refused_by_how_much(llama7b):
    _, config, numel, masks = llama7b
    shared_file = {**config["generation"], "vllm": {**config["generation"]["vllm"], "weight_update": "shared_file"}}
    plan = plan_of(make_config(llama7b, basis={"storage": "ram"}, generation=shared_file), host="48GiB")
    assert plan.members_on == "host memory"
    needed = 4 * 2 * numel + 3 * masks + 2 * numel + 4 * 32000 * 4096  # members, masks, shm file, fp32 scratch
    assert plan.used(HOST) == needed
    with pytest.raises(MemoryPlanError) as e:
        plan.check()
    assert f"host memory: the plan needs {gib(needed)} of 48.00 GiB, over by {gib(needed - 48 * GiB)}" in str(e.value)
    assert plan_of(make_config(llama7b, basis={"storage": "ram"}, generation=shared_file),
                   host="128GiB").problems() == []


def test_a_vllm_budget_smaller_than_the_weights_is_refused(llama7b):
    _, config, numel, _ = llama7b
    generation = {**config["generation"], "vllm": {**config["generation"]["vllm"], "memory_fraction": 0.1}}
    plan = plan_of(make_config(llama7b, generation=generation))
    (problem,) = plan.problems()
    assert "vLLM engine weights (bfloat16, 12.55 GiB) exceed generation.vllm.memory_fraction" in problem
    assert f"by {gib(2 * numel - int(0.1 * 80 * GiB))}" in problem


def test_transformers_on_the_gpu_members_there_or_pinned(llama7b):
    _, _, numel, masks = llama7b
    on_gpu = plan_of(make_config(llama7b, generation={"backend": "transformers"}, basis={"storage": "cuda"}))
    assert on_gpu.members_on == "GPU" and by_what(on_gpu, "resident model").nbytes == 4 * numel
    (problem,) = on_gpu.problems()
    assert problem.startswith("GPU memory: the plan needs") and "over by" in problem
    assert any("basis.storage: pinned would keep the members" in note for note in on_gpu.notes)
    pinned = plan_of(make_config(llama7b, generation={"backend": "transformers", "batch_size": 8},
                                 basis={"storage": "pinned"}), host="256GiB")
    assert pinned.members_on.startswith("pinned host memory")
    assert by_what(pinned, "basis members").where == HOST and by_what(pinned, "resident model").where == GPU
    assert pinned.used(HOST) == 4 * 2 * numel + 3 * masks
    assert pinned.problems() == []
    on_cpu = plan_of(make_config(llama7b, generation={"backend": "transformers"}, basis={"storage": "ram"}))
    assert on_cpu.used(GPU) == 0 and "the GPU is not used" in on_cpu.notes[0]


def test_vllm_refuses_members_on_the_gpu(llama7b):
    for storage in ("cuda", "pinned"):
        with pytest.raises(ConfigError, match=f"basis.storage: '{storage}' does not combine"):
            make_config(llama7b, basis={"storage": storage})


def test_plan_matches_what_a_basis_holds(tmp_path, family):
    base, experts = family
    for storage in ("ram", "ram_dense"):
        settings = BasisSettings(storage=storage)
        plan = plan_memory(base, experts, settings, RunConfig.model_fields["generation"].default, 80 * GiB)
        held = sum(a.nbytes for a in plan.allocations if a.what.startswith(("basis", "DARE masks")))
        assert held == build_basis(base, experts, tmp_path / "b", settings).nbytes(), storage


def test_parse_size():
    assert parse_size("80GiB") == parse_size("80G") == parse_size("80 gb") == 80 * GiB
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000 and parse_size("1.5T") == 1.5 * 2**40
    with pytest.raises(ConfigError, match="80 gigs"):
        parse_size("80 gigs")


def test_psomerge_plan_command(tmp_path, llama7b):
    _, config, _, _ = llama7b
    fits = tmp_path / "fits.yaml"
    fits.write_text(yaml.safe_dump(config))
    tight = tmp_path / "tight.yaml"
    tight.write_text(yaml.safe_dump({**config, "generation": {
        **config["generation"], "vllm": {**config["generation"]["vllm"], "memory_fraction": 0.1}}}))
    command = [sys.executable, "-m", "psomerge.cli", "plan", "--gpu-memory", "80GiB"]
    ok = subprocess.run([*command, str(fits)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "vLLM engine weights (bfloat16)" in ok.stdout and ok.stdout.strip().endswith("fits")
    refused = subprocess.run([*command, str(tight)], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "does not fit" in refused.stderr and "by 4.55 GiB" in " ".join(refused.stderr.split())


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak of the bytes held by tensors that ops create while it is on (inputs excluded)."""

    def __init__(self, inputs):
        super().__init__()
        self.inputs = {t.untyped_storage().data_ptr() for t in inputs}
        self.held, self.live, self.peak = set(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            key = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None
            if key is None or key in self.inputs or key in self.held:
                continue  # a view of an input or of a tensor already counted
            self.held.add(key)
            self.live += t.untyped_storage().nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._freed, key, t.untyped_storage().nbytes())
        return out

    def _freed(self, key, nbytes):
        self.held.discard(key)
        self.live -= nbytes


def test_the_planned_sum_temporaries_are_what_the_torch_sum_holds():
    """sum_scratch_bytes against the chunked torch sum (the GPU's, and the vLLM engine's) as it
    runs: bf16 members, so every member's chunk is an fp32 copy, as on a GPU."""
    from psomerge.swarm.masks import pack_bits
    from psomerge.swarm.materialise import masked_sum_into
    from psomerge.swarm.plan import ModelSize, sum_scratch_bytes

    n, g = 1 << 16, torch.Generator().manual_seed(0)
    dense = [torch.randn(n, generator=g).bfloat16() for _ in range(4)]
    bits = [pack_bits(torch.rand(n, generator=g) < 0.2) for _ in range(3)]
    out = torch.empty(n)
    with _LiveBytes([*dense, *bits, out]) as live:
        masked_sum_into(out, dense, bits, [0.4, 0.2, 0.3, 0.1], [0.5, -0.2, 0.0], compiled=False)
    ref = ModelSize("m", 2 * n, n, n // 8, n, torch.bfloat16)
    planned = sum_scratch_bytes(ref, len(dense))
    assert planned <= live.peak <= planned + 8  # and unpack_bits' eight shift amounts
