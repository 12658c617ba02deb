"""PEFT LoRA adapter folders as experts, checked against peft's own merge_and_unload."""

import json
import shutil

import numpy as np
import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from mergekit_runner import load_all
from psomerge.errors import CheckpointError
from psomerge.io import Checkpoint, LoraExpert, check_compatible, open_model
from psomerge.merging.engine import run_merge
from psomerge.merging.recipe import MergeRecipe
from psomerge.presets.synthetic import llama_config

LLAMA_ADAPTERS = {
    # rank and alpha per module, embedding LoRA, a full lm_head (modules_to_save)
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                     rank_pattern={"v_proj": 2, "layers.1.mlp.down_proj": 6},
                     alpha_pattern={"layers.1.self_attn.q_proj": 3, "down_proj": 5}, modules_to_save=["lm_head"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True,
                   target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def make_adapter(base_model, out, **lora):
    """An adapter made by peft itself, with non-zero A and B (and LoRA bias) and a changed
    modules_to_save copy."""
    torch.manual_seed(len(str(out)))
    model = get_peft_model(base_model, LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name or ("lora_B" in name and name.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return out


def merged_by_peft(base_cls, base_dir, adapter_dir):
    model = PeftModel.from_pretrained(base_cls.from_pretrained(base_dir), adapter_dir)
    return {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    torch.manual_seed(0)
    LlamaForCausalLM(llama_config(hidden=32, layers=2, vocab=64)).save_pretrained(root / "base")
    adapters = {}
    for name, lora in LLAMA_ADAPTERS.items():
        adapters[name] = make_adapter(LlamaForCausalLM.from_pretrained(root / "base"), root / name, **lora)
    return root / "base", adapters


@pytest.mark.parametrize("kind", sorted(LLAMA_ADAPTERS))
def test_lazy_expert_equals_merge_and_unload(llama_adapters, kind):
    base, adapters = llama_adapters
    expert = open_model(adapters[kind], base=base)
    assert isinstance(expert, LoraExpert)
    theirs = merged_by_peft(LlamaForCausalLM, base, adapters[kind])
    base_ck = Checkpoint(base)
    assert set(expert.tensor_names) == set(base_ck.tensor_names)
    changed = 0
    for name in expert.tensor_names:
        ours = expert.get(name)
        assert torch.equal(ours, theirs[name]), name  # same operations in the same order: bit-identical
        changed += not torch.equal(ours, base_ck.get(name))
    assert changed == len(expert.targets) > 0
    if kind == "patterns":
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(expert.targets)


def test_fan_in_fan_out_conv1d_adapter_equals_merge_and_unload(tmp_path):
    """GPT-2 stores Conv1D weights as (in, out): PEFT's fan_in_fan_out transposes the delta;
    lora_bias adds scaling * lora_B.bias to the layer's bias."""
    torch.manual_seed(1)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    adapter = make_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "a", r=4, lora_alpha=16,
                           target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    expert = open_model(adapter, base=tmp_path / "base")
    theirs = merged_by_peft(GPT2LMHeadModel, tmp_path / "base", adapter)
    for name in expert.tensor_names:
        if name in theirs:
            assert torch.equal(expert.get(name), theirs[name]), name
    assert any("c_attn.weight" in t for t in expert.targets) and any("c_attn.bias" in t for t in expert.targets)


def test_bin_adapter_and_bf16_base(tmp_path):
    torch.manual_seed(2)
    LlamaForCausalLM(llama_config()).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").exists()
    expert = open_model(tmp_path / "a", base=tmp_path / "base")
    theirs = merged_by_peft(LlamaForCausalLM, tmp_path / "base", tmp_path / "a")
    for name in expert.tensor_names:
        assert expert.get(name).dtype == torch.bfloat16
        assert torch.equal(expert.get(name), theirs[name].to(torch.bfloat16)), name


def test_fingerprint_covers_adapter_and_base(llama_adapters, tmp_path):
    base, adapters = llama_adapters
    fp = open_model(adapters["rslora"], base=base).fingerprint()
    assert fp != open_model(adapters["patterns"], base=base).fingerprint() != Checkpoint(base).fingerprint()
    copy = tmp_path / "copy"
    shutil.copytree(adapters["rslora"], copy)
    assert open_model(copy, base=base).fingerprint() == fp  # content, not place
    cfg = json.loads((copy / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 5
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    assert open_model(copy, base=base).fingerprint() != fp  # the scaling changed


@pytest.mark.parametrize("change, words", [
    ({"use_dora": True}, ["use_dora", "DoRA"]),
    ({"init_lora_weights": "pissa"}, ["init_lora_weights", "pissa"]),
    ({"peft_type": "IA3"}, ["peft_type", "IA3"]),
])
def test_unsupported_adapters_are_refused_by_name(llama_adapters, tmp_path, change, words):
    base, adapters = llama_adapters
    copy = tmp_path / "bad-adapter"
    shutil.copytree(adapters["rslora"], copy)
    cfg = {**json.loads((copy / "adapter_config.json").read_text()), **change}
    (copy / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        open_model(copy, base=base)
    assert "bad-adapter" in str(e.value) and all(w in str(e.value) for w in words)


def test_real_dora_adapter_is_refused(llama_adapters, tmp_path):
    base, _ = llama_adapters
    make_adapter(LlamaForCausalLM.from_pretrained(base), tmp_path / "dora", r=2, target_modules=["q_proj"],
                 use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        open_model(tmp_path / "dora", base=base)


def test_adapter_without_base_is_named(llama_adapters):
    _, adapters = llama_adapters
    with pytest.raises(CheckpointError, match="PEFT adapter folder.*base"):
        open_model(adapters["rslora"])


def test_merge_recipe_accepts_adapter_folders(llama_adapters, tmp_path):
    """A recipe over adapter folders gives what it gives over their merge_and_unload'ed models."""
    base, adapters = llama_adapters
    full = []
    for name in sorted(adapters):
        merged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapters[name]).merge_and_unload()
        merged.save_pretrained(tmp_path / f"full-{name}")
        full.append(tmp_path / f"full-{name}")
    check_compatible(Checkpoint(base), [open_model(adapters[n], base=base) for n in sorted(adapters)])

    def recipe(models):
        return {"merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
                "models": [{"model": str(m), "parameters": {"weight": 0.7, "density": 0.4}} for m in models]}

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe([adapters[n] for n in sorted(adapters)])))
    run_merge(MergeRecipe.load(path), tmp_path / "from-adapters")
    run_merge(MergeRecipe.from_dict(recipe(full)), tmp_path / "from-full")
    a, b = load_all(tmp_path / "from-adapters"), load_all(tmp_path / "from-full")
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    LlamaForCausalLM.from_pretrained(tmp_path / "from-adapters")


def test_swarm_run_accepts_an_adapter_expert(char_family, tmp_path, monkeypatch):
    from test_swarm_run import make_config

    from psomerge.pipeline import run_swarm

    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    adapter = make_adapter(LlamaForCausalLM.from_pretrained(root / "base"), tmp_path / "adapter-expert", r=4,
                           lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"])
    cfg = make_config(root, [experts[0], adapter], data)
    run = run_swarm(cfg.model_copy(update={"cache_path": tmp_path / "c.sqlite", "output_dir": tmp_path / "run"}))
    assert [label for label, _ in run.heldout] == ["base", "expert:e0", "expert:adapter-expert", "psomerge:paper"]
    assert run.basis.fingerprints[str(adapter)] == open_model(adapter, base=root / "base").fingerprint()
    # the adapter member of the basis is base + LoRA
    written = load_all(run.model_dir)
    assert set(written) == set(load_all(root / "base"))
    coeffs = np.zeros_like(run.best_position)
    coeffs[:, 2] = 1.0  # basis member 2: the adapter expert
    from psomerge.pipeline import RunContext

    ctx = RunContext(cfg.model_copy(update={"cache_path": tmp_path / "c.sqlite", "output_dir": tmp_path / "run"}))
    ctx.write_model(coeffs, tmp_path / "member2")
    expert = open_model(adapter, base=root / "base")
    for name, t in load_all(tmp_path / "member2").items():
        assert torch.equal(t, expert.get(name).float()), name
    ctx.close()
