import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from psomerge.presets.synthetic import llama_config, make_family
from psomerge.errors import CheckpointError, IncompatibleModelsError
from psomerge.io import Checkpoint, StreamingSafetensorsWriter, check_compatible, check_finite, copy_model_files


def test_single_sharded_and_bin_checkpoints_read_the_same_tensors(tmp_path):
    cfg = llama_config()
    base, _ = make_family(tmp_path / "single", 0, cfg)
    sharded, _ = make_family(tmp_path / "sharded", 0, cfg, max_shard_size="20KB")
    a, b = Checkpoint(base), Checkpoint(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len({i.file for i in b._infos.values()}) > 1
    assert a.tensor_names and sorted(a.tensor_names) == sorted(b.tensor_names)
    for name in a.tensor_names:
        assert torch.equal(a.get(name), b.get(name))
        assert a.info(name).shape == tuple(a.get(name).shape)


def test_bin_fallback(tmp_path):
    base, _ = make_family(tmp_path / "f", 0)
    state = load_file(base / "model.safetensors")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((base / "config.json").read_text())
    torch.save(state, binary / "pytorch_model.bin")
    ckpt = Checkpoint(binary)
    assert ckpt.format == "bin"
    for name, t in state.items():
        assert torch.equal(ckpt.get(name), t)


def test_streaming_writer_shards_and_loads_with_transformers(tmp_path, family):
    base, _ = family
    src = Checkpoint(base)
    plan = [(n, src.info(n).shape, torch.bfloat16) for n in src.tensor_names]
    out = tmp_path / "out"
    with StreamingSafetensorsWriter(out, plan, max_shard_bytes=16_000) as w:
        for name in reversed(src.tensor_names):  # any order
            w.write(name, src.get(name).to(torch.bfloat16))
    copy_model_files(base, out, torch.bfloat16)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src.tensor_names)
    assert len(set(index["weight_map"].values())) > 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    for name, p in model.state_dict().items():
        assert torch.equal(p, src.get(name).to(torch.bfloat16)), name


def test_writer_refuses_missing_tensor(tmp_path):
    w = StreamingSafetensorsWriter(tmp_path, [("a", (2,), torch.float32), ("b", (3,), torch.float32)])
    w.write("a", torch.ones(2))
    with pytest.raises(CheckpointError, match="'b'"):
        w.close()
    with pytest.raises(CheckpointError, match="'c'"):
        StreamingSafetensorsWriter(tmp_path / "x", [("a", (2,), torch.float32)]).write("c", torch.ones(2))


# -- validation errors name the model and tensor at fault ------------------------------


def _clone(src, dst, edit_state=None, edit_config=None):
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    state = load_file(src / "model.safetensors")
    if edit_state:
        edit_state(state)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_architecture_mismatch_names_both_models(tmp_path, family):
    base, experts = family

    def to_mistral(c):
        c["model_type"], c["architectures"] = "mistral", ["MistralForCausalLM"]

    bad = _clone(experts[0], tmp_path / "mistral", edit_config=to_mistral)
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible(Checkpoint(base, "base-m"), [Checkpoint(bad, "odd-one")])
    assert "odd-one" in str(e.value) and "base-m" in str(e.value) and "mistral" in str(e.value)


def test_missing_tensor_named(tmp_path, family):
    base, experts = family
    bad = _clone(experts[0], tmp_path / "m", edit_state=lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible(Checkpoint(base), [Checkpoint(bad, "expert-missing")])
    assert "expert-missing" in str(e.value) and "model.layers.1.mlp.up_proj.weight" in str(e.value)
    assert "missing" in str(e.value)


def test_extra_tensor_named(tmp_path, family):
    base, experts = family
    bad = _clone(experts[0], tmp_path / "x", edit_state=lambda s: s.__setitem__("score.weight", torch.ones(2)))
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible(Checkpoint(base), [Checkpoint(bad, "expert-extra")])
    assert "expert-extra" in str(e.value) and "score.weight" in str(e.value)


def test_shape_mismatch_named(tmp_path, family):
    base, experts = family

    def grow(s):
        s["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(32, 40)

    bad = _clone(experts[0], tmp_path / "s", edit_state=grow)
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible(Checkpoint(base), [Checkpoint(bad, "expert-shape")])
    msg = str(e.value)
    assert "expert-shape" in msg and "model.layers.0.self_attn.q_proj.weight" in msg and "[32, 40]" in msg


def test_vocab_mismatch_says_what_to_do(tmp_path, family):
    base, experts = family

    def resize(s):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            s[k] = torch.cat([s[k], torch.zeros(2, s[k].shape[1])])

    bad = _clone(experts[1], tmp_path / "v", edit_state=resize, edit_config=lambda c: c.update(vocab_size=66))
    with pytest.raises(IncompatibleModelsError) as e:
        check_compatible(Checkpoint(base, "the-base"), [Checkpoint(bad, "big-vocab")])
    msg = str(e.value)
    assert "big-vocab" in msg and "the-base" in msg and "66" in msg and "64" in msg
    assert "resize_token_embeddings" in msg


def test_nan_weights_named(tmp_path, family):
    _, experts = family

    def poison(s):
        s["model.norm.weight"][3] = float("nan")

    bad = _clone(experts[2], tmp_path / "n", edit_state=poison)
    ckpt = Checkpoint(bad, "nan-expert")
    with pytest.raises(CheckpointError) as e:
        check_finite(ckpt.get("model.norm.weight"), ckpt.name, "model.norm.weight")
    assert "nan-expert" in str(e.value) and "model.norm.weight" in str(e.value) and "1 NaN" in str(e.value)
    check_finite(ckpt.get("lm_head.weight"), ckpt.name, "lm_head.weight")  # clean tensors pass


def test_folder_errors_name_the_model(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        Checkpoint(tmp_path / "nowhere", "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint(tmp_path / "empty", "empty-model")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="'empty-model': no weights"):
        Checkpoint(tmp_path / "empty", "empty-model")


def test_fingerprint_tracks_content(tmp_path, family):
    base, experts = family
    assert Checkpoint(base).fingerprint() == Checkpoint(base).fingerprint()
    assert Checkpoint(base).fingerprint() != Checkpoint(experts[0]).fingerprint()
