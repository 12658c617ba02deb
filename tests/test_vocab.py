"""Experts whose tokenizers add tokens to the base's: tokenizer_source base / union, against mergekit."""

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from mergekit_runner import have_mergekit, load_all, run_mergekit, write_yaml
from psomerge.errors import ConfigError, IncompatibleModelsError
from psomerge.io import Checkpoint, check_compatible, open_model
from psomerge.io.vocab import align_vocabularies
from psomerge.merging.engine import run_merge
from psomerge.merging.recipe import MergeRecipe
from psomerge.presets.charlm import char_tokenizer, tiny_llama_config
from psomerge.presets.tiny_tasks import ALPHABET

EXPERT_TOKENS = {  # expert -> (plain added tokens, special added tokens)
    "e0": (["<add>", "<sum>"], ["<|calc|>"]),
    "e1": (["<rev>", "<sum>"], []),
}
EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def make_vocab_family(root, dtype=torch.float32):
    """A char-level base and two experts whose tokenizers add tokens (one shared by both, one
    special), embeddings resized and every weight perturbed."""
    tok = char_tokenizer(ALPHABET)
    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config(len(tok), hidden=32, layers=2, heads=2))
    base.to(dtype).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    experts = []
    for i, (name, (plain, special)) in enumerate(EXPERT_TOKENS.items()):
        etok = char_tokenizer(ALPHABET)
        etok.add_tokens(plain)
        if special:
            etok.add_special_tokens({"additional_special_tokens": special})
        expert = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
        expert.resize_token_embeddings(len(etok), mean_resizing=False)
        gen = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        expert.to(dtype).save_pretrained(root / name)
        etok.save_pretrained(root / name)
        experts.append(root / name)
    return root / "base", experts


@pytest.fixture(scope="module")
def vocab_family(tmp_path_factory):
    return make_vocab_family(tmp_path_factory.mktemp("vocab"))


def vocab_of(folder):
    return AutoTokenizer.from_pretrained(folder).get_vocab()


def recipe(method, base, experts, source, **params):
    data = {"merge_method": method, "dtype": "float32", "tokenizer_source": source,
            "models": [{"model": str(e), "parameters": {"weight": 0.6 + 0.2 * i, **params}}
                       for i, e in enumerate(experts)]}
    if method != "linear":
        data["base_model"] = str(base)
    return data


def test_without_a_policy_the_mismatch_is_named(vocab_family):
    base, experts = vocab_family
    with pytest.raises(IncompatibleModelsError, match="vocabulary size mismatch.*e0"):
        check_compatible(Checkpoint(base), [Checkpoint(e) for e in experts])


def test_base_policy_drops_expert_rows_with_a_warning(vocab_family, tmp_path, caplog):
    base, experts = vocab_family
    with caplog.at_level(logging.WARNING, logger="psomerge.io.vocab"):
        run_merge(MergeRecipe.from_dict(recipe("task_arithmetic", base, experts, "base")), tmp_path / "o")
    assert "'<add>'" in caplog.text and "'<|calc|>'" in caplog.text and "'<rev>'" in caplog.text
    assert vocab_of(tmp_path / "o") == vocab_of(base)
    out, b = load_all(tmp_path / "o"), load_all(base)
    assert out["model.embed_tokens.weight"].shape == b["model.embed_tokens.weight"].shape
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == len(vocab_of(base))
    LlamaForCausalLM.from_pretrained(tmp_path / "o")


def test_union_rows_are_filled_as_mergekit_fills_them(vocab_family):
    base, experts = vocab_family
    b, e0, e1 = (open_model(p) for p in (base, *experts))
    ab, (a0, a1) = align_vocabularies(b, [e0, e1], "union")
    vocab = ab.plan.tokenizer.get_vocab()
    v0, v1, vb = vocab_of(experts[0]), vocab_of(experts[1]), vocab_of(base)
    assert set(vocab) == set(vb) | set(v0) | set(v1) and len(vocab) == len(vb) + 4
    name = "model.embed_tokens.weight"
    rows = {m: t.get(name) for m, t in (("b", ab), ("e0", a0), ("e1", a1))}
    orig = {m: t.get(name).float() for m, t in (("b", b), ("e0", e0), ("e1", e1))}
    for m, v in (("e0", v0), ("e1", v1)):  # own rows where a model has the token
        for tok, i in v.items():
            assert torch.equal(rows[m][vocab[tok]], orig[m][i])
    # only e0 has <add>: every model gets e0's row; <sum> is in both experts: their mean
    for m in rows:
        assert torch.equal(rows[m][vocab["<add>"]], orig["e0"][v0["<add>"]])
        assert torch.equal(rows[m][vocab["<rev>"]], orig["e1"][v1["<rev>"]])
    mean = (torch.zeros(32) + orig["e0"][v0["<sum>"]] + orig["e1"][v1["<sum>"]]) / 2
    assert torch.equal(rows["b"][vocab["<sum>"]], mean)
    assert ab.config["vocab_size"] == len(vocab) and ab.info(name).shape == (len(vocab), 32)
    assert ab.fingerprint() != b.fingerprint()


def test_unknown_policy_is_named():
    data = {"merge_method": "linear", "models": [{"model": "x", "parameters": {"weight": 1}}],
            "tokenizer_source": "e0"}
    with pytest.raises(ConfigError, match="tokenizer_source 'e0'"):
        MergeRecipe.from_dict(data, source="r.yaml")


@pytest.mark.skipif(not have_mergekit(), reason="mergekit 0.1.5 not installed (pip install '.[compare]')")
def test_both_policies_equal_mergekit(vocab_family, tmp_path):
    """Every tensor equals mergekit's; vocabulary rows are compared by token, since mergekit
    orders tokens new to the union by its unordered set of models."""
    base, experts = vocab_family
    cases = {
        "ties_union": recipe("ties", base, experts, "union", density=0.5),
        "ta_union": recipe("task_arithmetic", base, experts, "union"),
        "linear_union": recipe("linear", base, experts, "union"),
        "ties_base": recipe("ties", base, experts, "base", density=0.5),
    }
    jobs = [(write_yaml(tmp_path / f"{n}.yaml", r), tmp_path / f"mk-{n}") for n, r in cases.items()]
    run_mergekit(jobs)
    for (path, mk), name in zip(jobs, cases):
        ours_dir = tmp_path / f"ours-{name}"
        run_merge(MergeRecipe.load(path), ours_dir)
        v_ours, v_mk = vocab_of(ours_dir), vocab_of(mk)
        assert set(v_ours) == set(v_mk), name
        cfg_ours, cfg_mk = (json.loads((d / "config.json").read_text()) for d in (ours_dir, mk))
        assert cfg_ours["vocab_size"] == cfg_mk["vocab_size"] == len(v_mk), name
        ours, theirs = load_all(ours_dir), load_all(mk)
        assert set(ours) == set(theirs)
        for t in theirs:
            if t in EMBEDDINGS:
                for tok, i in v_mk.items():
                    assert torch.equal(ours[t][v_ours[tok]], theirs[t][i]), (name, t, tok)
            else:
                assert torch.equal(ours[t], theirs[t]), (name, t)
        LlamaForCausalLM.from_pretrained(ours_dir)


def test_swarm_with_union_vocabulary(char_family, tmp_path, monkeypatch):
    """The basis holds aligned members; the merged model and the baseline get the union
    tokenizer and vocabulary size; without the policy the run stops with the named mismatch."""
    from test_swarm_run import make_config

    from psomerge.pipeline import run_swarm

    _, _, data = char_family
    base, experts = make_vocab_family(tmp_path / "fam")
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))
    cfg = make_config(tmp_path / "fam", experts, data)
    with pytest.raises(IncompatibleModelsError, match="vocabulary size mismatch"):
        run_swarm(cfg, evaluate_heldout=False)
    cfg = cfg.model_copy(update={"basis": cfg.basis.model_copy(update={"tokenizer_source": "union"}),
                                 "baselines": ["ties"]})
    run = run_swarm(cfg)
    assert [label for label, _ in run.heldout] == ["base", "expert:e0", "expert:e1", "ties", "psomerge:paper"]
    union = vocab_of(run.model_dir)
    assert set(union) == set(vocab_of(base)) | set(vocab_of(experts[0])) | set(vocab_of(experts[1]))
    assert json.loads((run.model_dir / "config.json").read_text())["vocab_size"] == len(union)
    model = LlamaForCausalLM.from_pretrained(run.model_dir)
    assert model.get_input_embeddings().weight.shape[0] == len(union)
    baseline = next((tmp_path / "home" / "cache" / "merges" / "ties").iterdir())
    assert vocab_of(baseline) == union
    # the merged rows of a token only e0 has: every basis member holds e0's row there
    v0 = vocab_of(experts[0])
    row = load_all(run.model_dir)["model.embed_tokens.weight"][union["<add>"]]
    assert torch.allclose(row, load_all(experts[0])["model.embed_tokens.weight"][v0["<add>"]], atol=1e-6)
