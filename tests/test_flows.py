"""The Prefect pipeline with MLflow tracking and the registry, against real components."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from transformers import AutoModelForCausalLM

from psomerge.tracking import registry as tracking

ROOT = Path(__file__).resolve().parents[1]


def write_config(path, char_family, name, steps=2, optimizer="pso", runner=None, baselines=("average",)):
    root, experts, data = char_family
    cfg = {
        "name": name, "preset": "paper", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": [{"name": n, "dataset": str(p), "optimisation_size": 10, "heldout_size": 20,
                    "judge": {"type": "exact_match", "normalizer": "none"}} for n, p in data.items()],
        "generation": {"max_new_tokens": 6, "batch_size": 64},
        "optimizer": {"type": optimizer, "steps": steps},
        "registry": {"model_name": f"{name}-model"}, "baselines": list(baselines),
    }
    if runner:
        cfg["runner"] = runner
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def test_pso_flow_tracks_registers_and_promotes(tmp_path, home, char_family):
    from psomerge.orchestration.flows import pso_merge

    cfg = write_config(tmp_path / "run.yaml", char_family, "flow")
    summary = pso_merge(str(cfg))
    assert [r.label for r in summary.rows] == ["base", "expert:e0", "expert:e1", "average", "psomerge:pso"]
    assert summary.counts.fitness_calls == 5 * 3
    reg = summary.registration
    assert reg.version == "1" and reg.promotion["promoted"]

    tracking.configure("psomerge")
    client = MlflowClient()
    run = client.get_run(reg.run_id)
    assert run.data.params["optimizer.type"] == "pso"
    assert len(client.get_metric_history(run.info.run_id, "best_fitness")) == 3  # steps 0..2
    for name in ("best_addition", "mean_fitness", "std_fitness", "scorings", "cache_hits"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"convergence.png", "coefficients.png", "swarm", "tables", "model"} <= artifacts
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert [c.info.run_name for c in children] == ["baseline:average"]
    version = client.get_model_version_by_alias("flow-model", "champion")
    assert str(version.version) == "1" and "base" in version.tags and "config_hash" in version.tags
    assert float(version.tags["heldout_score"]) == pytest.approx(summary.rows[-1].heldout.fitness)
    local = tracking.download("models:/flow-model@champion", tmp_path / "dl")
    AutoModelForCausalLM.from_pretrained(local)

    # a second run of the same config scores nothing new
    again = pso_merge(str(cfg))
    assert again.counts.scorings == 0 and again.counts.cache_hits == again.counts.fitness_calls
    assert again.registration.version == "2" and not again.registration.promotion["promoted"]  # a tie never promotes


def _register(name, score, tmp_path, tag=True):
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "weights.txt").write_text(str(score))
    with mlflow.start_run():
        return tracking.register_version(tmp_path / "m", name, score if tag else float("nan"), {"note": "test"})


def test_promotion_gate(tmp_path, home):
    tracking.configure("gate")
    name = "gate-model"
    assert _register(name, 0.50, tmp_path) == "1"
    assert tracking.promote(name)["promoted"]  # first champion
    _register(name, 0.40, tmp_path)
    d = tracking.promote(name)
    assert not d["promoted"] and "does not beat" in d["reason"]  # a worse candidate is not promoted
    _register(name, 0.50, tmp_path)
    assert not tracking.promote(name)["promoted"]  # a tie is not promoted
    _register(name, 0.52, tmp_path)
    assert not tracking.promote(name, margin=0.05)["promoted"]  # within the margin
    assert tracking.promote(name, margin=0.01)["promoted"]
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "4"
    client = MlflowClient()
    v = _register(name, 0.9, tmp_path)
    client.delete_model_version_tag(name, v, tracking.HELDOUT_TAG)
    assert not tracking.promote(name)["promoted"]  # a missing score never promotes


# In the child: SIGKILL itself in the middle of scoring its Nth particle (after it was
# scored, before its result reached the flow): a crash at a known point.
KILL_AT = """
import os, signal
from psomerge.swarm import fitness
_call = fitness.ParticleEvaluator.__call__
def _dying(self, coeffs, *args):
    result = _call(self, coeffs, *args)
    if self.counts.scorings >= {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
fitness.ParticleEvaluator.__call__ = _dying
"""


def _flow_subprocess(cfg, home, resume=False, kill_at=None):
    code = (KILL_AT.format(n=kill_at) if kill_at else "") + (
        "import sys, json; from psomerge.orchestration.settings import apply_defaults; apply_defaults()\n"
        "from psomerge.orchestration.flows import pso_merge\n"
        f"s = pso_merge({str(cfg)!r}, resume={resume}); print('SUMMARY' + json.dumps(s.counts.as_dict()) + "
        "'|' + repr(s.best_fitness))")
    return subprocess.Popen([sys.executable, "-c", code], env=_isolated_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def _isolated_env(home, **extra):
    """A child with its own data dir: no Prefect settings inherited from this process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return {**env, "PSOMERGE_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def _reap(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _summary(proc):
    out, _ = proc.communicate(timeout=600)
    Path("/tmp/flow_child.log").write_text(out)
    assert proc.returncode == 0, out[-3000:]
    line = next(l for l in out.splitlines() if l.startswith("SUMMARY"))
    counts, best = line.removeprefix("SUMMARY").split("|")
    return json.loads(counts), float(best)


def test_resume_after_killed_run_loses_and_repeats_no_scoring(tmp_path, char_family):
    cfg = write_config(tmp_path / "run.yaml", char_family, "resume", steps=4, baselines=())
    full_counts, full_best = _summary(_flow_subprocess(cfg, tmp_path / "full"))

    proc = _flow_subprocess(cfg, tmp_path / "killed", kill_at=8)  # dies during step 1
    proc.wait(timeout=600)
    _reap(proc)  # the dead flow's temporary Prefect server still holds the pipe
    assert proc.returncode == -signal.SIGKILL
    checkpoint = tmp_path / "killed" / "runs" / "resume" / "checkpoint.json"
    assert json.loads(checkpoint.read_text())["optimizer_state"]["step"] == 1
    resumed_counts, resumed_best = _summary(_flow_subprocess(cfg, tmp_path / "killed", resume=True))
    assert resumed_best == full_best
    from psomerge.swarm.cache import FitnessCache

    cached_full = len(FitnessCache(tmp_path / "full" / "cache" / "fitness.sqlite"))
    cached_killed = len(FitnessCache(tmp_path / "killed" / "cache" / "fitness.sqlite"))
    assert cached_killed == cached_full  # the same particles and final evaluations, each stored once
    # the crashed process scored 8: 5 in step 0 (checkpointed, counted) and 3 in step 1 (cached
    # but never checkpointed); the resumed run takes those 3 from the cache instead of rescoring
    assert resumed_counts["scorings"] == full_counts["scorings"] - 3
    assert resumed_counts["fitness_calls"] == full_counts["fitness_calls"]


def _start(cmd, env, url, timeout=120):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"{cmd[0]} did not start")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flow_on_two_worker_dask_cluster(tmp_path, char_family):
    pytest.importorskip("prefect_dask")
    port = _free_port()
    env = _isolated_env(tmp_path / "home", PREFECT_HOME=str(tmp_path / "prefect"),
                        PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false")
    server = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    env, f"http://127.0.0.1:{port}/api/health")
    try:
        cfg = write_config(tmp_path / "run.yaml", char_family, "dask", steps=1, baselines=(),
                           runner={"type": "dask", "max_workers": 2})
        code = ("import json; from psomerge.orchestration.settings import apply_defaults; apply_defaults()\n"
                "from psomerge.orchestration.flows import run_flow\n"
                "if __name__ == '__main__':\n"
                f"    s = run_flow({str(cfg)!r})\n"
                "    print('SUMMARY' + json.dumps(s.counts.as_dict()) + '|' + repr(s.best_fitness))\n")
        script = tmp_path / "run_dask.py"
        script.write_text(code)
        run_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        proc = subprocess.Popen([sys.executable, str(script)], env=run_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        counts, best = _summary(proc)
        assert counts["fitness_calls"] == 10 and counts["scorings"] + counts["cache_hits"] == 10
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_mlflow_tracking_server_on_loopback(tmp_path, monkeypatch):
    port = _free_port()
    server = _start([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                     "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                     "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
                    {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, f"http://127.0.0.1:{port}/health")
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))
        tracking.configure("remote")
        assert mlflow.get_tracking_uri() == f"http://127.0.0.1:{port}"
        assert _register("remote-model", 0.6, tmp_path) == "1"
        assert tracking.promote("remote-model")["promoted"]
        local = tracking.download("models:/remote-model@champion", tmp_path / "dl")
        assert (local / "weights.txt").read_text() == "0.6"
        assert not (tmp_path / "home" / "mlflow.db").exists()  # nothing went to the embedded store
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_deployment_carries_the_cron_schedule(tmp_path, char_family):
    from psomerge.orchestration.flows import pso_merge

    cfg = write_config(tmp_path / "run.yaml", char_family, "nightly")
    deployment = pso_merge.to_deployment(name="nightly", cron="0 3 * * *", parameters={"config_path": str(cfg)})
    assert deployment.name == "nightly"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * *"]
    assert deployment.parameters == {"config_path": str(cfg)}


def test_flow_with_llm_judge_reports_judge_usage(tmp_path, home, char_family):
    from chat_server import ChatServer
    from psomerge.orchestration.flows import pso_merge

    path = write_config(tmp_path / "run.yaml", char_family, "judged", steps=1, baselines=())
    cfg = yaml.safe_load(path.read_text())
    with ChatServer() as server:
        cfg["suites"][0]["judge"] = {"type": "llm", "model": "judge", "base_url": server.url, "scale": [1, 10],
                                     "price_per_mtok_prompt": 1.0}
        path.write_text(yaml.safe_dump(cfg))
        first = pso_merge(str(path)).counts
        assert first.judge_calls == len(server.requests) > 0
        assert first.judge_tokens == 13 * first.judge_calls  # the server reports 10 + 3 tokens a call
        assert first.judge_cost == pytest.approx(10 * first.judge_calls / 1e6)
        assert first.judge_cache_hits >= 0 and first.generated_tokens > 0
        again = pso_merge(str(path)).counts
        assert again.judge_calls == 0 and again.scorings == 0
