"""Runs that must not lie: no stale score after an input changed, no NaN model, no resume
that mixes two searches, no run clobbering another's folder, clear errors for bad configs."""

import json
import logging
import re
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from psomerge.config import RunConfig
from psomerge.errors import CheckpointError, ConfigError, RunLockedError
from psomerge.evaluation.suite import read_records
from psomerge.merging.baselines import baseline_checkpoint
from psomerge.pipeline import RunContext, run_swarm
from psomerge.swarm import member_coefficients
from psomerge.swarm.cache import FitnessCache
from psomerge.swarm.run import RunLock

PSOMERGE = str(Path(sys.executable).parent / "psomerge")
CLI_ENV = {**os.environ, "COLUMNS": "1000"}  # error lines unwrapped
WEIGHTS = "model.safetensors"


@pytest.fixture
def fam(char_family, tmp_path, monkeypatch):
    """A private copy of the char family (tests edit its files), and a private data dir."""
    root, experts, data = char_family
    dst = tmp_path / "fam"
    dst.mkdir()
    for folder in (root / "base", *experts):
        shutil.copytree(folder, dst / folder.name)
    for path in data.values():
        shutil.copy(path, dst / path.name)
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))
    return dst, [dst / e.name for e in experts], {n: dst / p.name for n, p in data.items()}


def config_dict(fam, steps=1, **extra):
    """PSO-Merging as published (2N+1 particles) unless ``extra`` says otherwise: fast, and
    the counts below are exact."""
    root, experts, data = fam
    return {
        "name": "t", "preset": "paper", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": [{"name": n, "dataset": str(p), "optimisation_size": 10, "heldout_size": 20,
                    "judge": {"type": "exact_match", "normalizer": "none"}} for n, p in data.items()],
        "generation": {"max_new_tokens": 4, "batch_size": 64},
        "optimizer": {"type": "pso", "steps": steps}, "baselines": [],
        "output_dir": str(root / "run"), "cache_path": str(root / "fitness.sqlite"), **extra,
    }


def make_config(fam, **kw):
    return RunConfig.from_dict(config_dict(fam, **kw))


def search(cfg, resume=False):
    return run_swarm(cfg, resume=resume, evaluate_heldout=False)


def edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data, indent=2))


def retrain(folder, scale=0.05, seed=1):
    """The expert 'retrained in place': new weights in the same folder."""
    import torch

    state = load_file(folder / WEIGHTS)
    gen = torch.Generator().manual_seed(seed)
    for t in state.values():
        if t.is_floating_point():
            t.add_(scale * torch.randn(t.shape, generator=gen))
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})


def set_rope_theta(cfg):
    cfg["rope_parameters"]["rope_theta"] = 500.0


# -- 1: a cache key covers everything that changes an answer ----------------------------

@pytest.mark.parametrize("preset", ["paper", "psomerge"])  # psomerge: static merges join the basis
def test_editing_the_base_config_rescores_every_particle(fam, preset):
    cfg = make_config(fam, preset=preset)
    first = search(cfg)
    assert first.counts.scorings > 0
    assert search(cfg).counts.scorings == 0  # unchanged inputs: all from the cache
    edit_json(fam[0] / "base" / "config.json", set_rope_theta)
    again = search(cfg)
    assert again.counts.scorings == first.counts.scorings  # nothing served from the old scores


def _add_token(tok):
    tok["added_tokens"].append({**tok["added_tokens"][-1], "id": tok["added_tokens"][-1]["id"] + 1,
                                "content": "<extra>"})


EDITS = {
    "base config": lambda r: edit_json(r / "base" / "config.json", set_rope_theta),
    "base generation config": lambda r: edit_json(r / "base" / "generation_config.json",
                                                  lambda g: g.update(eos_token_id=5)),
    "base tokenizer": lambda r: edit_json(r / "base" / "tokenizer.json", _add_token),
    "base tokenizer config": lambda r: edit_json(r / "base" / "tokenizer_config.json",
                                                 lambda t: t.update(model_max_length=32)),
    "expert config": lambda r: edit_json(r / "e1" / "config.json", set_rope_theta),
    "expert tokenizer": lambda r: edit_json(r / "e0" / "tokenizer.json", _add_token),
    "expert generation config": lambda r: edit_json(r / "e0" / "generation_config.json",
                                                    lambda g: g.update(eos_token_id=5)),
    "expert retrained": lambda r: retrain(r / "e0"),
    "a data field only a scorer reads": lambda r: _edit_records(r / "addition.jsonl",
                                                                lambda rec: rec.update(tests="x")),
}


def _edit_records(path, edit):
    records = read_records(path)
    for rec in records:
        edit(rec)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in records))


@pytest.mark.parametrize("what", list(EDITS))
def test_particle_keys_change_with_every_input(fam, what):
    coeffs = member_coefficients(5, 1, 1)
    before = RunContext(make_config(fam))
    keys = (before.evaluator.key(coeffs), before.evaluator.key(coeffs, "heldout"))
    before.close()
    EDITS[what](fam[0])
    after = RunContext(make_config(fam))
    assert after.evaluator.key(coeffs) not in keys and after.evaluator.key(coeffs, "heldout") not in keys
    after.close()


def _suite(edit):
    return lambda cfg: edit(cfg["suites"][0])


SETTINGS = {  # config edits that change what a score means
    "split seed": _suite(lambda s: s.update(split_seed=1)),
    "optimisation size": _suite(lambda s: s.update(optimisation_size=11)),
    "scorer": _suite(lambda s: s["judge"].update(normalizer="text")),
    "prompt template": _suite(lambda s: s.update(prompt_template="Q: {question}")),
    "answer field": _suite(lambda s: s.update(answer_field="question")),
    "suite weight": _suite(lambda s: s.update(weight=2.0)),
    "generation": lambda cfg: cfg["generation"].update(max_new_tokens=5),
    "DARE drop rate": lambda cfg: cfg.setdefault("basis", {}).update(drop_rate=0.5),
}


@pytest.mark.parametrize("what", list(SETTINGS))
def test_particle_keys_change_with_every_setting_that_changes_a_score(fam, what):
    coeffs = member_coefficients(5, 1, 1)
    before = RunContext(make_config(fam))
    keys = {before.evaluator.key(coeffs), before.evaluator.key(coeffs, "heldout"), before.evaluator.fitness_key(coeffs)}
    before.close()
    edited = config_dict(fam)
    SETTINGS[what](edited)
    after = RunContext(RunConfig.from_dict(edited))
    assert not {after.evaluator.key(coeffs), after.evaluator.key(coeffs, "heldout"),
                after.evaluator.fitness_key(coeffs)} & keys
    after.close()


def test_a_new_scoring_code_version_rescores(fam, monkeypatch):
    from psomerge.swarm import cache

    coeffs = member_coefficients(5, 1, 1)
    ctx = RunContext(make_config(fam))
    old = ctx.evaluator.fitness_key(coeffs)
    monkeypatch.setattr(cache, "SCORING_VERSION", cache.SCORING_VERSION + "+1")
    assert ctx.evaluator.fitness_key(coeffs) != old
    ctx.close()


def test_a_static_baseline_is_merged_again_after_an_expert_is_retrained(fam):
    root, experts, _ = fam
    first = baseline_checkpoint("average", root / "base", experts, 0, root / "baselines")
    weights = load_file(first / WEIGHTS)
    assert baseline_checkpoint("average", root / "base", experts, 0, root / "baselines") == first  # reused
    retrain(experts[0])
    second = baseline_checkpoint("average", root / "base", experts, 0, root / "baselines")
    assert second != first
    new = load_file(second / WEIGHTS)
    assert any(not (new[k] == weights[k]).all() for k in weights)


# -- 5: non-finite weights in the base --------------------------------------------------

@pytest.mark.parametrize("model, value", [("base", float("nan")), ("e1", float("inf"))])
def test_non_finite_weights_are_refused_before_the_search(fam, model, value):
    folder = fam[0] / model
    state = load_file(folder / WEIGHTS)
    state["model.layers.0.self_attn.q_proj.weight"][1, 2] = value
    save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
    cfg = make_config(fam)
    with pytest.raises(CheckpointError) as e:
        search(cfg)
    assert str(folder) in str(e.value) and "model.layers.0.self_attn.q_proj.weight" in str(e.value)
    assert not (cfg.run_dir() / "checkpoint.json").exists()
    assert len(FitnessCache(cfg.fitness_cache_path())) == 0  # nothing was scored


# -- 8: resume only what the checkpoint searched ---------------------------------------

def test_resume_after_editing_suite_data_names_the_suite(fam):
    cfg = make_config(fam)
    search(cfg)
    _edit_records(fam[2]["reversal"], lambda rec: rec.update(answer=rec["answer"] + "!"))
    with pytest.raises(ConfigError, match="suite 'reversal' data changed since the checkpoint"):
        search(cfg.model_copy(update={"optimizer": cfg.optimizer.model_copy(update={"steps": 2})}), resume=True)


def test_resume_after_retraining_an_expert_names_it(fam):
    cfg = make_config(fam)
    search(cfg)
    retrain(fam[1][1])
    with pytest.raises(ConfigError, match="model 'e1' changed"):
        search(cfg, resume=True)


def test_resume_after_editing_the_config_names_the_key(fam):
    search(make_config(fam))
    edited = config_dict(fam)
    edited["optimizer"]["seed"] = 7
    with pytest.raises(ConfigError, match=r"config key 'optimizer.seed' changed \(0 -> 7\)"):
        search(RunConfig.from_dict(edited), resume=True)


def test_resume_with_more_steps_continues_the_same_search(fam):
    first = search(make_config(fam, steps=1))
    longer = search(make_config(fam, steps=2), resume=True)
    assert longer.history[:2] == first.history and len(longer.history) == 3
    assert longer.counts.fitness_calls == 15  # 10 from the checkpoint, counted once


def test_resume_with_another_optimizer_is_a_clean_error(fam):
    search(make_config(fam, preset="psomerge"))
    edited = config_dict(fam, preset="psomerge")
    edited["optimizer"] = {"type": "cmaes", "steps": 1}
    with pytest.raises(ConfigError, match="checkpoint of a pso run; this run's optimizer is cmaes"):
        search(RunConfig.from_dict(edited), resume=True)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]),
    lambda p: p.write_text('{"version": 2, "optimizer_state": {"optimizer": "pso"}}'),
    lambda p: p.write_bytes(b"\x00" * 100),
    lambda p: p.unlink(),
])
def test_resume_from_a_damaged_or_missing_checkpoint_names_the_file(fam, damage):
    cfg = make_config(fam)
    search(cfg)
    checkpoint = cfg.run_dir() / "checkpoint.json"
    damage(checkpoint)
    with pytest.raises(CheckpointError, match=str(checkpoint)):
        search(cfg, resume=True)


def test_resume_from_a_truncated_checkpoint_on_the_command_line(fam):
    cfg_path = fam[0] / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config_dict(fam)))
    cfg = RunConfig.load(cfg_path)
    search(cfg)
    checkpoint = cfg.run_dir() / "checkpoint.json"
    checkpoint.write_text(checkpoint.read_text()[:100])
    res = subprocess.run([PSOMERGE, "swarm", str(cfg_path), "--resume"], capture_output=True, text=True,
                         timeout=300, env=CLI_ENV)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and str(checkpoint) in res.stderr and "truncated or corrupt" in res.stderr


# -- 9: command-line overrides ---------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"optimizer.type": "adam"}, "optimizer.type"),
    ({"optimizer.steps": -3}, "optimizer.steps"),
    ({"optimizer.type": "cmaes", "optimizer.steps": "many"}, "optimizer.steps"),
])
def test_bad_overrides_are_errors_naming_the_key(fam, overrides, key):
    path = fam[0] / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(fam)))
    with pytest.raises(ConfigError, match=rf"run.yaml: key '{key}'"):
        RunConfig.load(path, overrides)


def test_bad_override_on_the_command_line_names_the_option(fam):
    path = fam[0] / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(fam)))
    res = subprocess.run([PSOMERGE, "swarm", str(path), "--steps", "-3"], capture_output=True, text=True,
                         timeout=300, env=CLI_ENV)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "optimizer.steps" in res.stderr and "--steps -3" in res.stderr


def test_bad_optimizer_for_the_demo_fails_before_building_it(tmp_path):
    home = tmp_path / "home"
    res = subprocess.run([PSOMERGE, "swarm", "--optimizer", "adam"], capture_output=True, text=True, timeout=120,
                         env={**CLI_ENV, "PSOMERGE_HOME": str(home)})
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "'adam' is not one of" in res.stderr and "--optimizer adam" in res.stderr
    assert not (home / "demo").exists()  # nothing was built


def test_an_overridden_optimizer_runs_in_its_own_folder(fam):
    path = fam[0] / "run.yaml"
    path.write_text(yaml.safe_dump(config_dict(fam, preset="psomerge")))
    pso = RunConfig.load(path)
    search(pso)
    pso_checkpoint = (pso.run_dir() / "checkpoint.json").read_text()
    cmaes = RunConfig.load(path, {"optimizer.type": "cmaes"})
    assert cmaes.optimizer.type == "cmaes" and cmaes.name == "t-cmaes"
    assert cmaes.run_dir() != pso.run_dir() and cmaes.run_dir().name == "run-cmaes"
    search(cmaes)
    assert (pso.run_dir() / "checkpoint.json").read_text() == pso_checkpoint  # the PSO run is untouched
    written = json.loads((cmaes.run_dir() / "checkpoint.json").read_text())
    assert written["optimizer_state"]["optimizer"] == "cmaes"
    # overriding with the file's own optimizer is the same run
    assert RunConfig.load(path, {"optimizer.type": "pso", "optimizer.steps": 3}).run_dir() == pso.run_dir()


# -- 10: one run at a time in a run folder ---------------------------------------------

def test_a_second_run_in_a_locked_folder_fails_at_once(fam):
    cfg = make_config(fam)
    with RunLock(cfg.run_dir()):
        start = time.monotonic()
        with pytest.raises(RunLockedError) as e:
            search(cfg)
        assert time.monotonic() - start < 5
    assert str(cfg.run_dir()) in str(e.value) and f"process {os.getpid()}" in str(e.value)
    assert search(cfg).counts.fitness_calls == 10  # released: the next run goes ahead


HOLDER = """
import json, sys, time
from pathlib import Path
from psomerge.config import RunConfig
from psomerge.pipeline import run_swarm

cfg = RunConfig.from_dict(json.loads(Path(sys.argv[1]).read_text()))

def hang(report):
    Path(sys.argv[2]).write_text("running")
    time.sleep(600)

run_swarm(cfg, on_step=hang, evaluate_heldout=False)
"""


def test_a_running_run_holds_its_folder_until_it_is_killed(fam, tmp_path):
    cfg_json = tmp_path / "cfg.json"
    cfg_json.write_text(json.dumps(config_dict(fam)))
    ready = tmp_path / "ready"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(cfg_json), str(ready)], env=os.environ)
    try:
        deadline = time.monotonic() + 240
        while not ready.exists():
            assert holder.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.2)
        cfg = make_config(fam)
        with pytest.raises(RunLockedError) as e:
            search(cfg)
        assert str(cfg.run_dir()) in str(e.value) and f"process {holder.pid}" in str(e.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    resumed = search(cfg, resume=True)  # the killed run's lock does not block; its step 0 is resumed
    assert len(resumed.history) == 2 and resumed.counts.fitness_calls == 10


# -- experts: duplicates, same names, copies of the base ---------------------------------

def test_the_same_expert_twice_is_refused_by_name(fam, tmp_path):
    data = config_dict(fam)
    data["experts"] = [data["experts"][0], data["experts"][1], data["experts"][0] + "/"]
    with pytest.raises(ConfigError, match=r"key 'experts'.*experts\[2\].*same folder as experts\[0\]"):
        RunConfig.from_dict(data)
    link = tmp_path / "link"
    link.symlink_to(data["experts"][1])
    data["experts"] = [data["experts"][1], str(link)]
    with pytest.raises(ConfigError, match=r"experts\[1\].*same folder as experts\[0\]"):
        RunConfig.from_dict(data)


def test_experts_whose_folders_share_a_name_keep_distinct_rows(fam):
    root, experts, _ = fam
    for i, e in enumerate(experts):
        (root / f"team{i}").mkdir()
        shutil.move(e, root / f"team{i}" / "expert")
    data = config_dict(fam)
    data["experts"] = [str(root / f"team{i}" / "expert") for i in range(2)]
    run = run_swarm(RunConfig.from_dict(data))
    labels = [label for label, _ in run.heldout]
    assert labels == ["base", "expert:team0/expert", "expert:team1/expert", "psomerge:paper"]
    assert run.basis.labels == ["base", "expert:team0/expert", "expert:team1/expert",
                                "dare:team0/expert", "dare:team1/expert"]
    # the run's MLflow tags keep one fingerprint per expert, each under its distinct label
    from mlflow import MlflowClient

    from psomerge.tracking import MLflowTracker

    tracker = MLflowTracker()
    run_id = tracker.start(run.config, run.basis, None)["mlflow_run_id"]
    tracker.close(failed=False)
    tags = MlflowClient().get_run(run_id).data.tags
    prints = {k.removeprefix("fingerprint."): v for k, v in tags.items() if k.startswith("fingerprint.")}
    assert set(prints) == {"base", "team0/expert", "team1/expert"}
    assert prints["team0/expert"] != prints["team1/expert"]


@pytest.mark.parametrize("differs_in", ["config", "tokenizer"])
def test_an_expert_with_the_base_weights_is_named_in_a_warning(fam, caplog, differs_in):
    root, experts, _ = fam
    shutil.copy(root / "base" / WEIGHTS, experts[1] / WEIGHTS)  # same weights, the expert's own config or tokenizer
    if differs_in == "config":
        edit_json(experts[1] / "config.json", set_rope_theta)
    else:
        edit_json(experts[1] / "tokenizer.json", _add_token)
    with caplog.at_level(logging.WARNING, logger="psomerge"):
        search(make_config(fam, steps=0))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(experts[1]) in m and "same weights as base" in m for m in warned), warned
    assert not any(str(experts[0]) in m for m in warned)


# -- errors the lead fixed, kept fixed ---------------------------------------------------

@pytest.mark.parametrize("template", ["Q: {} A:", "Q: {0} A:"])
def test_positional_placeholder_in_a_prompt_template_fails_at_config_load(fam, template):
    data = config_dict(fam)
    data["suites"][0]["prompt_template"] = template
    with pytest.raises(ConfigError, match=r"key 'suites.0.prompt_template'.*positional placeholder"):
        RunConfig.from_dict(data)


def test_a_jsonl_line_that_is_not_an_object_names_file_and_line(fam):
    path = fam[2]["addition"]
    lines = path.read_text().splitlines()
    lines.insert(3, "[1, 2]")
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4: a record must be a JSON object, got list")):
        RunContext(make_config(fam))


def test_a_misspelled_baseline_fails_at_config_load(fam):
    with pytest.raises(ConfigError, match=r"key 'baselines.*unknown baseline 'tie'; known: average"):
        RunConfig.from_dict(config_dict(fam, baselines=["average", "tie"]))
