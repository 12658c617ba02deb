"""Static merges and the swarm's resident models on the architectures users bring.

Tiny models of each family (Qwen2: q/k/v biases and tied embeddings; Mistral and Llama with
grouped-query attention; Gemma: tied embeddings, its own norm; GPT-2: Conv1D weights under
``transformer.``, and as the hub ships it, without that prefix; Phi-3: fused qkv and gate_up),
merged and compared tensor by tensor with a hand computation of each method, loaded back
with transformers; PEFT LoRA experts against peft's own merge_and_unload.
"""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers as tf
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GenerationConfig

from mergekit_runner import load_all
from psomerge.config import BasisSettings
from psomerge.errors import CheckpointError, IncompatibleModelsError
from psomerge.merging.engine import run_merge
from psomerge.merging.recipe import MergeRecipe
from psomerge.swarm.basis import build_basis
from psomerge.swarm.materialise import writable_tensors

V = 96
_COMMON = dict(vocab_size=V, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, **_COMMON)
CONFIGS = {
    "qwen2": lambda: tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **_DECODER),
    "mistral": lambda: tf.MistralConfig(num_key_value_heads=1, sliding_window=None, **_DECODER),
    "llama": lambda: tf.LlamaConfig(num_key_value_heads=2, **_DECODER),
    "gemma": lambda: tf.GemmaConfig(num_key_value_heads=1, head_dim=8, **_DECODER),
    "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=V),
    "phi3": lambda: tf.Phi3Config(num_key_value_heads=4, original_max_position_embeddings=64, **_DECODER),
}
WEIGHTS = (0.5, 0.7)


def build_family(root, arch, n_experts=2):
    """A base (random weights, norms and biases moved off their init) and experts that are the
    base plus seeded noise, each with a generation config."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[arch]())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    gen = GenerationConfig(max_new_tokens=5, do_sample=False)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    folders = []
    for i in range(-1, n_experts):
        if i >= 0:
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(base[n] + 0.02 * torch.randn(p.shape, generator=g))
        out = root / ("base" if i < 0 else f"e{i}")
        model.save_pretrained(out)
        gen.save_pretrained(out)
        folders.append(out)
    return folders[0], folders[1:]


def merge(tmp_path, method, base, experts, weights=WEIGHTS, density=None, lam=0.8):
    models = [{"model": str(e), "parameters": {"weight": w, **({"density": density} if density else {})}}
              for e, w in zip(experts, weights)]
    data = {"merge_method": method, "models": models}
    if method != "linear":
        data |= {"base_model": str(base), "parameters": {"lambda": lam}}
    out = tmp_path / f"out-{method}"
    run_merge(MergeRecipe.from_dict(data), out)
    return out


def ref_task_arithmetic(base, experts, weights, lam):
    return {n: b + lam * sum(w * (e[n].float() - b) for e, w in zip(experts, weights))
            for n, b in ((n, b.float()) for n, b in base.items())}


def ref_linear(experts, weights):
    return {n: sum(w * e[n].float() for e, w in zip(experts, weights)) / sum(weights) for n in experts[0]}


def trim(delta, density):
    """TIES trim, per tensor: the k = max(1, int(density * numel)) largest magnitudes."""
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = 1
    return (flat * keep).reshape(delta.shape)


def ref_ties(base, experts, weights, density, lam):
    """TIES with normalize (the default): sign elected by the weighted sum, disjoint mean
    over the agreeing models' weights."""
    out = {}
    for n, b in base.items():
        b = b.float()
        d = torch.stack([w * trim(e[n].float() - b, density) for e, w in zip(experts, weights)])
        w = torch.tensor(weights).reshape(-1, *[1] * b.dim())
        agree = (d.sign() == torch.where(d.sum(0) >= 0, 1.0, -1.0)).float()
        divisor = (w * agree).sum(0)
        divisor[divisor == 0] = 1
        out[n] = b + lam * (d * agree).sum(0) / divisor
    return out


def assert_same(got, ref):
    assert set(got) == set(ref)
    for n in ref:
        assert torch.allclose(got[n].float(), ref[n], atol=1e-6, rtol=1e-5), n


def assert_loads(out, base_dir):
    for f in ("config.json", "generation_config.json"):
        assert (out / f).exists(), f
    config, base_config = (json.loads((d / "config.json").read_text()) for d in (out, base_dir))
    assert config == base_config
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()
    if base_config.get("tie_word_embeddings", True):
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    return model


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_static_merges_equal_the_hand_computation(tmp_path, arch):
    base_dir, expert_dirs = build_family(tmp_path, arch)
    base, experts = load_all(base_dir), [load_all(e) for e in expert_dirs]
    out = merge(tmp_path, "task_arithmetic", base_dir, expert_dirs)
    assert_same(load_all(out), ref_task_arithmetic(base, experts, WEIGHTS, 0.8))
    assert_loads(out, base_dir)
    out = merge(tmp_path, "ties", base_dir, expert_dirs, density=0.5)
    assert_same(load_all(out), ref_ties(base, experts, WEIGHTS, 0.5, 0.8))
    assert_loads(out, base_dir)
    out = merge(tmp_path, "linear", base_dir, expert_dirs)
    assert_same(load_all(out), ref_linear(experts, WEIGHTS))
    assert_loads(out, base_dir)


LORA = {
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
    "phi3": dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"]),
    "qwen2": dict(r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj"]),
}


@pytest.mark.parametrize("arch", sorted(LORA))
def test_lora_expert_merges_as_its_merge_and_unload(tmp_path, arch):
    base_dir, (full,) = build_family(tmp_path, arch, n_experts=1)
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(**LORA[arch]))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    unloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    base = load_all(base_dir)
    as_peft = {n: t for n, t in unloaded.merge_and_unload().state_dict().items() if n in base}
    experts = [as_peft, load_all(full)]
    out = merge(tmp_path, "task_arithmetic", base_dir, [tmp_path / "adapter", full])
    assert_same(load_all(out), ref_task_arithmetic(base, experts, WEIGHTS, 0.8))
    assert_loads(out, base_dir)


def hub_gpt2(tmp_path):
    """GPT-2 as the hub ships it: names without ``transformer.``, the causal-mask buffers saved."""
    base_dir, expert_dirs = build_family(tmp_path / "gpt2", "gpt2")
    for folder in (base_dir, *expert_dirs):
        state = {n.removeprefix("transformer."): t for n, t in load_file(folder / "model.safetensors").items()}
        for i in range(2):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return base_dir, expert_dirs


def test_hub_gpt2_layout_merges_and_loads(tmp_path):
    base_dir, expert_dirs = hub_gpt2(tmp_path)
    base, experts = load_all(base_dir), [load_all(e) for e in expert_dirs]
    out = merge(tmp_path, "ties", base_dir, expert_dirs, density=0.5)
    assert_same(load_all(out), ref_ties(base, experts, WEIGHTS, 0.5, 0.8))
    model = assert_loads(out, base_dir)
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, load_all(out)["h.1.mlp.c_fc.weight"])


def test_particle_reaches_every_parameter_of_a_hub_gpt2_resident(tmp_path):
    """Regression: checkpoint names without the model's ``transformer.`` prefix matched no
    parameter of the resident model, so every particle was silently scored as the base."""
    base_dir, expert_dirs = hub_gpt2(tmp_path)
    basis = build_basis(base_dir, expert_dirs, tmp_path / "cache", BasisSettings())
    resident = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    coeffs = np.zeros((basis.num_groups, basis.k))
    coeffs[:, :3] = [0.2, 0.5, 0.3]
    basis.materialise(coeffs, resident)
    base, e0, e1 = load_all(base_dir), *(load_all(e) for e in expert_dirs)
    for name, p in resident.named_parameters():
        short = name.removeprefix("transformer.")
        assert torch.allclose(p, 0.2 * base[short] + 0.5 * e0[short] + 0.3 * e1[short], atol=1e-6), name


def test_a_parameter_no_checkpoint_tensor_reaches_is_an_error(tmp_path):
    base_dir, expert_dirs = build_family(tmp_path, "llama")
    basis = build_basis(base_dir, expert_dirs, tmp_path / "cache", BasisSettings())
    resident = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    resident.model.norm.register_parameter("extra", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(CheckpointError, match="model.norm.extra"):
        basis.materialise(np.ones((basis.num_groups, basis.k)) / basis.k, resident)
    mapping = {"a": torch.zeros(1)}
    assert writable_tensors(mapping, ["b"]) is mapping  # a mapping (a vLLM engine's weights) is taken as given


def _trained_adapter(tmp_path, base_dir, **lora):
    torch.manual_seed(1)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, lora_alpha=4, **lora))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def test_adapter_that_unties_the_embeddings_is_refused_with_the_reason(tmp_path):
    # peft's merge of a full embed_tokens copy on a tied model unties input and output
    # embeddings; a merge over the base's tensors cannot write that, so it must not pretend to
    base_dir, (full,) = build_family(tmp_path, "qwen2", n_experts=1)
    adapter = _trained_adapter(tmp_path, base_dir, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    with pytest.raises(CheckpointError, match=r"full copy \(modules_to_save\) of 'model\.embed_tokens\.weight'.*"
                                              r"ties to its output embedding.*Untie the base first"):
        merge(tmp_path, "task_arithmetic", base_dir, [adapter, full])
    assert not (tmp_path / "out-task_arithmetic").exists()


def test_over_an_untied_base_the_embedding_copy_merges_as_peft_does(tmp_path):
    # the way out the error above names: the base saved untied, the adapter trained over it
    tied_dir, (full,) = build_family(tmp_path, "qwen2", n_experts=1)
    base_dir = tmp_path / "untied"
    shutil.copytree(tied_dir, base_dir)
    state = load_file(base_dir / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, base_dir / "model.safetensors", metadata={"format": "pt"})
    for folder in (base_dir, full):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    state = load_file(full / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, full / "model.safetensors", metadata={"format": "pt"})
    adapter = _trained_adapter(tmp_path, base_dir, target_modules=["q_proj"], modules_to_save=["embed_tokens"])
    unloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter)
    base = load_all(base_dir)
    as_peft = {n: t for n, t in unloaded.merge_and_unload().state_dict().items() if n in base}
    out = merge(tmp_path, "task_arithmetic", base_dir, [adapter, full])
    assert_same(load_all(out), ref_task_arithmetic(base, [as_peft, load_all(full)], WEIGHTS, 0.8))


def test_adapter_on_the_lm_head_of_a_tied_model_says_why(tmp_path):
    base_dir, (full,) = build_family(tmp_path, "qwen2", n_experts=1)
    adapter = _trained_adapter(tmp_path, base_dir, target_modules=["q_proj", "lm_head"])
    with pytest.raises(CheckpointError, match=r"lm_head.*ties its output embedding to its input one"):
        merge(tmp_path, "task_arithmetic", base_dir, [adapter, full])


def test_redundant_lm_head_of_a_tied_expert_is_ignored(tmp_path):
    base_dir, (e0, e1) = build_family(tmp_path, "qwen2", n_experts=2)
    state = load_file(e0 / "model.safetensors")
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()  # as some trainers save it
    save_file(state, e0 / "model.safetensors", metadata={"format": "pt"})
    out = merge(tmp_path, "task_arithmetic", base_dir, [e0, e1])
    base, experts = load_all(base_dir), [load_all(e0), load_all(e1)]
    for e in experts:
        e.pop("lm_head.weight", None)
    assert "lm_head.weight" not in load_all(out)
    assert_same(load_all(out), ref_task_arithmetic(base, experts, WEIGHTS, 0.8))
    assert_loads(out, base_dir)
    # where the expert's config does not say it ties, its lm_head may be trained: refused
    config = json.loads((e0 / "config.json").read_text())
    del config["tie_word_embeddings"]
    (e0 / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelsError, match=r"has 1 tensor\(s\) that base .* lacks: 'lm_head.weight'"):
        merge(tmp_path, "ties", base_dir, [e0, e1], density=0.5)


def test_layouts_that_differ_by_a_leading_module_are_named(tmp_path):
    # a hub GPT-2 base with an expert saved by transformers (which adds 'transformer.')
    base_dir, expert_dirs = hub_gpt2(tmp_path)
    _, (saved,) = build_family(tmp_path / "saved", "gpt2", n_experts=1)
    with pytest.raises(IncompatibleModelsError, match=r"missing .* with and without a leading module"):
        merge(tmp_path, "task_arithmetic", base_dir, [expert_dirs[0], saved])
