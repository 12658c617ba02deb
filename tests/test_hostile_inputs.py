"""Hostile or unusual input to ``psomerge merge`` and to config loading: each is refused before
any expensive work, with an error naming the file, key, model or tensor at fault, and never
destroys what is already on disk."""

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from psomerge import cli
from psomerge.config import RunConfig
from psomerge.errors import CheckpointError, ConfigError, IncompatibleModelsError
from psomerge.io import Checkpoint
from psomerge.merging.engine import run_merge
from psomerge.merging.recipe import MergeRecipe
from psomerge.presets.synthetic import llama_config, make_family

UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture()
def models(tmp_path):
    base, experts = make_family(tmp_path / "m", n_experts=2, config=llama_config())
    return base, experts


def ties(base, experts, **extra):
    data = {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts], **extra}
    return MergeRecipe.from_dict(data, source="recipe.yaml")


def copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    save_file(edit(state), dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def merge_cli(tmp_path, monkeypatch, recipe: dict, out, *args):
    monkeypatch.setattr(cli.console, "width", 10_000)  # one line per message
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(cli.app, ["merge", str(path), "--out", str(out), *args])
    return result.exit_code, " ".join(result.output.split())


def recipe_dict(base, experts, weight=1.0):
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": weight}} for e in experts]}


# -- models --------------------------------------------------------------------------------

def test_config_json_that_is_not_an_object_names_model_and_file(models, tmp_path):
    base, experts = models
    (experts[1] / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"expert1.*config\.json is not a model config"):
        Checkpoint(experts[1], name=str(experts[1]))


def test_integer_tensor_where_the_base_has_floats_is_refused(models, tmp_path):
    base, experts = models
    bad = copy_with(experts[0], tmp_path / "quantized", lambda s: {**s, UP: s[UP].to(torch.int32)})
    with pytest.raises(IncompatibleModelsError, match=rf"dtype mismatch in tensor '{UP}'.*quantized.*int32"):
        run_merge(ties(base, [experts[1], bad]), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bf16_expert_merges_with_fp32_base(models, tmp_path):
    base, experts = models
    half = copy_with(experts[0], tmp_path / "bf16", lambda s: {k: v.to(torch.bfloat16) for k, v in s.items()})
    run_merge(ties(base, [experts[1], half]), tmp_path / "out")
    assert Checkpoint(tmp_path / "out").dtype == torch.float32


def test_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path):
    _, experts = make_family(tmp_path / "s", n_experts=1, config=llama_config(), max_shard_size="20KB")
    index_path = experts[0] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.ghost.weight"] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"expert0.*places 1 tensor.*'model.ghost.weight' \({shard}\)"):
        Checkpoint(experts[0], name=str(experts[0]))


def test_tied_expert_against_untied_base_says_so(models, tmp_path):
    base, experts = models
    tied = copy_with(experts[0], tmp_path / "tied", lambda s: {k: v for k, v in s.items() if k != "lm_head.weight"})
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    with pytest.raises(IncompatibleModelsError, match=r"tied.*missing 1 tensor.*'lm_head.weight'.*tie_word_embeddings"):
        run_merge(ties(base, [experts[1], tied]), tmp_path / "out")


def test_stale_index_entry_of_a_tied_lm_head_is_ignored(tmp_path):
    _, experts = make_family(tmp_path / "s", n_experts=1, config=llama_config(), max_shard_size="20KB")
    folder = experts[0]
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"].pop("lm_head.weight")  # the model tied after a re-shard, its index not
    save_file({k: v for k, v in load_file(folder / shard).items() if k != "lm_head.weight"}, folder / shard,
              metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = shard
    index_path.write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    assert "lm_head.weight" not in Checkpoint(folder).tensor_names
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(CheckpointError, match=r"places 1 tensor.*'lm_head.weight'"):
        Checkpoint(folder)


def _word_tokenizer(folder, order, words=None):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    order = list(order)
    words = words or [f"w{i}" for i in range(len(order))]
    tok = Tokenizer(tok_models.WordLevel({w: j for w, j in zip(words, order)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)


def test_same_vocab_size_but_another_tokenizer_is_refused(models, tmp_path):
    base, experts = models
    size = json.loads((base / "config.json").read_text())["vocab_size"]
    for folder in (base, experts[0]):
        _word_tokenizer(folder, range(size))
    _word_tokenizer(experts[1], reversed(range(size)))  # the same tokens, other ids
    run_merge(ties(base, [experts[0]]), tmp_path / "same")  # one tokenizer: fine
    with pytest.raises(IncompatibleModelsError, match=r"tokenizer mismatch: model '.*expert1'.*tokenizer_source"):
        run_merge(ties(base, experts), tmp_path / "out")
    run_merge(ties(base, experts, tokenizer_source="base"), tmp_path / "aligned")  # the way out it names


def test_placeholder_tokens_that_moved_are_no_mismatch(models, tmp_path):
    # Llama 3 and 3.1 give <|reserved_special_token_N|> other ids; those rows are untrained
    base, experts = models
    size = json.loads((base / "config.json").read_text())["vocab_size"]
    words = [f"w{i}" for i in range(size - 2)] + ["<|reserved_special_token_0|>", "<unused1>"]
    for folder in (base, experts[0]):
        _word_tokenizer(folder, range(size), words)
    _word_tokenizer(experts[1], [*range(size - 2), size - 1, size - 2], words)
    run_merge(ties(base, experts), tmp_path / "out")


# -- output folder -------------------------------------------------------------------------

def test_output_folder_of_other_files_is_kept(models, tmp_path):
    base, experts = models
    out = tmp_path / "notes"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=rf"output {out} is a folder of other files"):
        run_merge(ties(base, experts), out)
    assert (out / "keep.txt").read_text() == "mine"
    run_merge(ties(base, experts), tmp_path / "merged")
    run_merge(ties(base, experts), tmp_path / "merged")  # a previous merge is replaced


@pytest.mark.parametrize("which", ["expert", "base", "parent"])
def test_output_folder_holding_an_input_model_is_refused(models, tmp_path, which):
    base, experts = models
    out = {"expert": experts[1], "base": base, "parent": base.parent}[which]
    before = (experts[1] / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"is, or holds, the folder of input model"):
        run_merge(ties(base, experts), out)
    assert (experts[1] / "model.safetensors").read_bytes() == before
    assert Checkpoint(base).tensor_names


def test_output_that_is_a_file_or_under_a_file(models, tmp_path, monkeypatch):
    base, experts = models
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, message in [(afile, "exists and is not a folder"), (afile / "m", "cannot create its folder")]:
        code, text = merge_cli(tmp_path, monkeypatch, recipe_dict(base, experts), out)
        assert code == 2 and f"{out}" in text and message in text, text
    assert afile.read_text() == "x"


def test_nan_weight_writes_nothing(models, tmp_path, monkeypatch):
    base, experts = models
    code, text = merge_cli(tmp_path, monkeypatch, recipe_dict(base, experts, weight=float("nan")), tmp_path / "out")
    assert code == 2 and "models[0].parameters.weight: nan is not a finite number" in text, text
    assert not (tmp_path / "out").exists()


def test_overflow_of_the_output_dtype_writes_nothing(models, tmp_path, monkeypatch):
    base, experts = models
    recipe = {**recipe_dict(base, experts, weight=1e30), "out_dtype": "float16"}  # finite in fp32, inf in fp16
    code, text = merge_cli(tmp_path, monkeypatch, recipe, tmp_path / "out")
    assert code == 2 and "merged tensor" in text and "is not finite" in text and "float16" in text, text
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["abc", "0", "-5M", ""])
def test_bad_shard_size_is_named(models, tmp_path, monkeypatch, size):
    base, experts = models
    code, text = merge_cli(tmp_path, monkeypatch, recipe_dict(base, experts), tmp_path / "out", "--shard-size", size)
    assert code == 2 and f"--shard-size {size!r} is not a positive size" in text, text


# -- config files --------------------------------------------------------------------------

def test_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe\x00merge_method")
    with pytest.raises(ConfigError, match=rf"{path}: cannot read recipe: not UTF-8"):
        MergeRecipe.load(path)
    with pytest.raises(ConfigError, match=rf"{path}: cannot read config: not UTF-8"):
        RunConfig.load(path)


def _run_config(tmp_path, base, experts, **extra):
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("\n".join(json.dumps({"id": i, "question": "q", "answer": "a"}) for i in range(12)))
    data = {"base": str(base), "experts": [str(e) for e in experts],
            "suites": [{"name": "s", "dataset": str(data_file), "prompt_template": "{question}",
                        "answer_field": "answer", "id_field": "id", "optimisation_size": 4, "validation_size": 4}],
            **extra}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_run_config_refuses_the_base_among_experts(models, tmp_path):
    base, experts = models
    path = _run_config(tmp_path, base, [base, experts[0]])
    with pytest.raises(ConfigError, match=rf"{path}: experts\[0\] .* is the base folder"):
        RunConfig.load(path)


@pytest.mark.parametrize("name", ["", "..", "../../elsewhere", "a/b"])
def test_run_name_must_be_a_folder_name(models, tmp_path, name):
    base, experts = models
    path = _run_config(tmp_path, base, experts, name=name)
    with pytest.raises(ConfigError, match=rf"{path}: key 'name': .* is not a plain folder name"):
        RunConfig.load(path)


# -- recipe parameters ---------------------------------------------------------------------

@pytest.mark.parametrize("where, key, value, message", [
    ("model", "weight", "half", r"models\[0\]\.parameters\.weight: 'half' is not a finite number"),
    ("model", "weight", float("nan"), r"models\[0\]\.parameters\.weight: nan is not a finite number"),
    ("model", "density", 1.5, r"models\[0\]\.parameters\.density: 1\.5 is not in \[0, 1\]"),
    ("model", "density", -0.5, r"models\[0\]\.parameters\.density: -0\.5 is not in \[0, 1\]"),
    ("shared", "normalize", "false", r"parameters\.normalize: 'false' is not true or false"),
    ("shared", "lambda", [{"filter": "mlp", "value": "x"}, {"value": 1.0}],
     r"parameters\.lambda: 'x' is not a finite number"),
])
def test_bad_parameter_values_are_named_when_the_recipe_loads(models, where, key, value, message):
    base, experts = models
    data = {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts]}
    if where == "model":
        data["models"][0]["parameters"][key] = value
    else:
        data["parameters"] = {key: value}
    with pytest.raises(ConfigError, match=r"recipe\.yaml: " + message):
        MergeRecipe.from_dict(data, source="recipe.yaml")


def test_mergekit_flag_spellings_are_understood(models):
    # mergekit-evolve writes flags as 1.0 / 0.0, and mergekit's rescale is a flag
    base, experts = models
    data = {"merge_method": "dare_ties", "base_model": str(base),
            "parameters": {"int8_mask": 1.0, "normalize": 0.0, "rescale": True},
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}} for e in experts]}
    options = MergeRecipe.from_dict(data, source="recipe.yaml").options(UP)
    assert (options.int8_mask, options.normalize, options.rescale) == (True, False, "l1")
    data["parameters"] = {"rescale": False, "normalize": 1}
    options = MergeRecipe.from_dict(data, source="recipe.yaml").options(UP)
    assert (options.normalize, options.rescale) == (True, "none")
    data["parameters"] = {"int8_mask": 0.5}
    with pytest.raises(ConfigError, match=r"parameters\.int8_mask: 0\.5 is not true or false"):
        MergeRecipe.from_dict(data, source="recipe.yaml")


def test_exponent_without_a_dot_is_a_number(models, tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; mergekit's recipes take it as a number
    base, experts = models
    path = tmp_path / "recipe.yaml"
    path.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
                    + "".join(f"  - model: {e}\n    parameters: {{weight: 5e-1}}\n" for e in experts)
                    + "parameters: {lambda: 1e0}\n")
    recipe = MergeRecipe.load(path)
    assert recipe.model_params(0, UP).weight == 0.5 and recipe.options(UP).lam == 1.0


def test_method_limits_fail_before_any_tensor_is_written(models, tmp_path):
    base, experts = models
    # DELLA's density +/- epsilon leaves (0, 1] only for the attention tensors (a filter list)
    data = {"merge_method": "della", "base_model": str(base), "models": [
        {"model": str(e), "parameters": {"weight": 1.0, "density": 0.5,
                                          "epsilon": [{"filter": "self_attn", "value": 0.6}, {"value": 0.1}]}}
        for e in experts]}
    written = []
    with pytest.raises(ConfigError, match=r"recipe\.yaml: models\[0\] .*tensor .model\.layers\.0\.self_attn.*DELLA"):
        run_merge(MergeRecipe.from_dict(data, source="recipe.yaml"), tmp_path / "out", on_tensor=written.append)
    assert written == [] and not (tmp_path / "out").exists()
    # a filter list with no default that misses a tensor: named before any tensor is merged
    data["models"][0]["parameters"]["epsilon"] = [{"filter": "mlp", "value": 0.1}]
    with pytest.raises(ConfigError, match=r"epsilon: no filter matches tensor"):
        run_merge(MergeRecipe.from_dict(data, source="recipe.yaml"), tmp_path / "out", on_tensor=written.append)
    assert written == []


def test_dare_density_zero_is_refused_before_work(models, tmp_path):
    base, experts = models
    data = {"merge_method": "dare_ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.0}} for e in experts]}
    with pytest.raises(ConfigError, match=r"models\[0\] .*density 0\.0: DARE keeps each entry"):
        run_merge(MergeRecipe.from_dict(data, source="recipe.yaml"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_duplicate_and_missing_experts_are_refused(models, tmp_path):
    base, experts = models
    twice = recipe_dict(base, [experts[0], f"{experts[0]}/"])
    with pytest.raises(ConfigError, match=r"models\[1\] .* is the folder of models\[0\] again"):
        run_merge(MergeRecipe.from_dict(twice, source="recipe.yaml"), tmp_path / "out")
    base_again = recipe_dict(base, [experts[0], f"{base}/"])  # the base spelt another way
    with pytest.raises(ConfigError, match=r"models\[1\] .* is the base_model folder"):
        run_merge(MergeRecipe.from_dict(base_again, source="recipe.yaml"), tmp_path / "out")
    only_base = recipe_dict(base, [base])
    with pytest.raises(ConfigError, match="models lists no model to merge besides the base"):
        MergeRecipe.from_dict(only_base, source="recipe.yaml")
    assert not (tmp_path / "out").exists()
