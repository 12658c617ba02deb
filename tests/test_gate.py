"""The promotion gate compares champion and candidate on the same examples: a champion
measured on other examples is re-scored on the candidate's, through a real run."""

from mlflow import MlflowClient

from psomerge.config import RunConfig
from psomerge.pipeline import InProcessScoring, run_pipeline


def config(root, experts, data, name, split_seed, validation, max_new_tokens):
    return RunConfig.from_dict({
        "name": name, "preset": "paper", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": [{"name": n, "dataset": str(p), "optimisation_size": 8, "validation_size": validation,
                    "heldout_size": 8, "split_seed": split_seed,
                    "judge": {"type": "exact_match", "normalizer": "none"}} for n, p in data.items()],
        "generation": {"max_new_tokens": max_new_tokens, "batch_size": 64},
        "optimizer": {"type": "pso", "steps": 0}, "baselines": [],
        "registry": {"experiment": "gate", "model_name": "gate-e2e"},
    })


def test_a_champion_scored_on_other_examples_is_rescored_on_the_candidates(char_family, tmp_path, monkeypatch):
    from psomerge.tracking import MLflowTracker

    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = config(root, experts, data, "a", split_seed=0, validation=20, max_new_tokens=6)
    one = run_pipeline(first, scoring=InProcessScoring(first), tracker=MLflowTracker())
    assert one.registration.promotion["promoted"]  # first champion, scored on 20 + 20 validation examples
    # the same merge (identical weights) served with other decoding and scored on 5 other examples per suite:
    # before, its higher score on easier examples displaced the champion
    second = config(root, experts, data, "b", split_seed=1, validation=5, max_new_tokens=7)
    two = run_pipeline(second, scoring=InProcessScoring(second), tracker=MLflowTracker())
    decision = two.registration.promotion
    assert (two.best_position == one.best_position).all()
    assert two.registration.version != one.registration.version
    assert decision["rescored_champion"] and not decision["promoted"]
    assert "not beyond noise" in decision["reason"]
    assert "vs champion" in decision["reason"]
    champion = MlflowClient().get_model_version_by_alias("gate-e2e", "champion")
    assert str(champion.version) == one.registration.version
    assert champion.tags["gate_examples"] == "40" and champion.tags["gate_split"] == "validation"
