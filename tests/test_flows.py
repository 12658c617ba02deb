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


def test_pso_flow_tracks_registers_and_promotes(tmp_path, home, char_family, monkeypatch):
    from psomerge.evaluation import EvalSuite, evaluate
    from psomerge.generation import open_generator
    from psomerge.orchestration.flows import pso_merge

    cfg = write_config(tmp_path / "run.yaml", char_family, "flow")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # everything a run writes belongs under $PSOMERGE_HOME
    summary = pso_merge(str(cfg))
    assert [r.label for r in summary.rows] == ["base", "expert:e0", "expert:e1", "average", "psomerge:paper"]
    assert summary.counts.fitness_calls == 5 * 3
    reg = summary.registration
    assert reg.version == "1" and reg.promotion["promoted"] and not reg.reused

    tracking.configure("psomerge")
    client = MlflowClient()
    run = client.get_run(reg.run_id)
    assert run.data.params["optimizer.type"] == "pso"
    assert len(client.get_metric_history(run.info.run_id, "best_fitness")) == 3  # steps 0..2
    for name in ("best_addition", "mean_fitness", "std_fitness", "scorings", "cache_hits"):
        assert client.get_metric_history(run.info.run_id, name), name
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"convergence.png", "coefficients.png", "swarm", "tables"} <= artifacts
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert [c.info.run_name for c in children] == ["baseline:average"]
    version = client.get_model_version_by_alias("flow-model", "champion")
    assert str(version.version) == "1" and "base" in version.tags and "config_hash" in version.tags
    assert json.loads(version.tags["coefficients"]) == summary.best_position.round(6).tolist()
    assert float(version.tags["heldout_score"]) == pytest.approx(summary.rows[-1].heldout.fitness)
    logged = client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.source_run_id == reg.run_id  # an MLflow model logged by this run
    local = tracking.download("models:/flow-model@champion", tmp_path / "dl")
    AutoModelForCausalLM.from_pretrained(local)

    # the champion loads as an MLflow model and answers as the run's merged model does with the
    # run's generation settings: the same answers, the same held-out scores
    served = mlflow.pyfunc.load_model("models:/flow-model@champion")
    suites = [EvalSuite.from_settings(s) for s in summary.config.suites]
    prompts = [ex.prompt for s in suites for ex in s.split("heldout")]
    merged = open_generator(summary.config.generation, summary.model_dir)
    assert served.predict(prompts) == merged.generate(prompts)

    class Served:
        def generate(self, prompts):
            return served.predict(list(prompts))

    assert evaluate(Served(), suites, "heldout").scores == summary.rows[-1].heldout.scores

    # a second run of the same config scores nothing new, and registers no duplicate of its model
    again = pso_merge(str(cfg))
    assert again.counts.scorings == 0 and again.counts.cache_hits == again.counts.fitness_calls
    assert again.registration.version == "1" and again.registration.reused
    assert not again.registration.promotion["promoted"]  # the gate ran: the candidate is already the champion
    assert "already the champion" in again.registration.promotion["reason"]
    assert len(client.search_model_versions("name = 'flow-model'")) == 1
    assert client.get_run(again.registration.run_id).data.tags["reused_version"] == "True"
    assert list(workdir.iterdir()) == []  # no stray mlruns/ (nor anything else) in the working directory
    assert list((home / "mlartifacts").iterdir())


def _register(name, score, tmp_path, tag=True, key=None, gate=None):
    """A version of a fake model (a folder with one text file), with per-example gate scores
    whose mean is ``score`` (200 examples of one suite) unless ``gate`` is given; its model
    key is its score unless given."""
    from psomerge.evaluation.gate import GateScores
    from psomerge.generation import TransformersSettings

    if gate is None and tag:
        ones = round(score * 200)
        gate = GateScores("validation", "fp", {"s": [1.0] * ones + [0.0] * (200 - ones)}, {"s": 1.0})
    (tmp_path / "m").mkdir(exist_ok=True)
    (tmp_path / "m" / "weights.txt").write_text(str(score))
    with mlflow.start_run():
        return tracking.register_version(tmp_path / "m", name, score, {"note": "test"}, key=key or f"test-{score}",
                                         generation=TransformersSettings(), gate=gate).version


def test_promotion_gate(tmp_path, home):
    from psomerge.evaluation.gate import GateScores

    tracking.configure("gate")
    name = "gate-model"
    assert _register(name, 0.50, tmp_path) == "1"
    assert tracking.promote(name)["promoted"]  # first champion
    _register(name, 0.40, tmp_path)
    d = tracking.promote(name)
    assert not d["promoted"] and "not beyond noise" in d["reason"]  # a worse candidate is not promoted
    _register(name, 0.50, tmp_path, key="another model")
    assert not tracking.promote(name)["promoted"]  # a tie is not promoted
    # 0.52: the champion's 100 right examples (1.0 x 100, then 0.0 x 100) plus four more, on the same 200
    better = [1.0] * 104 + [0.0] * 96
    _register(name, 0.52, tmp_path, gate=GateScores("validation", "fp", {"s": better}, {"s": 1.0}))
    assert not tracking.promote(name, margin=0.05)["promoted"]  # within the margin
    assert not tracking.promote(name, margin=0.01)["promoted"]  # beyond the margin, but not beyond noise
    decision = tracking.promote(name, margin=0.0)
    assert decision["promoted"] and decision["p_not_better"] < 0.05
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "4"
    # the same mean gain spread over many disagreements is noise
    noisy = [1.0 - v for v in better[:60]] + better[60:164] + [1.0] * 36
    _register(name, sum(noisy) / 200, tmp_path, gate=GateScores("validation", "fp", {"s": noisy}, {"s": 1.0}))
    assert not tracking.promote(name)["promoted"]
    # a candidate without per-example scores, or scored on no example, never promotes
    _register(name, 0.9, tmp_path, tag=False, key="no scores")
    assert "no per-example scores" in tracking.promote(name)["reason"]
    _register(name, 0.95, tmp_path, key="empty", gate=GateScores("validation", "fp", {"s": []}, {"s": 1.0}))
    assert "no example" in tracking.promote(name)["reason"]
    # scores measured on other examples are never compared as they are
    _register(name, 1.0, tmp_path, key="easy five", gate=GateScores("validation", "other", {"s": [1.0] * 5},
                                                                     {"s": 1.0}))
    d = tracking.promote(name)
    assert not d["promoted"] and "different examples" in d["reason"]
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "4"


def test_registration_reuses_the_same_model_and_serves_it_over_http(tmp_path, home, char_family):
    """A version is an MLflow model: registered once per (basis, coefficients, decoding), and
    `mlflow models serve` answers prompts with it on loopback as psomerge's generator does."""
    import numpy as np

    from psomerge.generation import TransformersSettings, open_generator

    root, _, data = char_family
    tracking.configure("serve")
    settings = TransformersSettings(max_new_tokens=6)
    coeffs = np.array([[1.0, 0.0, 0.0]])

    def register(coefficients, generation):
        with mlflow.start_run():
            key = tracking.model_key("basis", coefficients, generation)
            return tracking.register_version(root / "base", "served", 0.5, {"note": "base"}, key=key,
                                             generation=generation)

    assert register(coeffs, settings) == tracking.RegisteredVersion("1", reused=False)
    assert register(coeffs + 1e-8, settings) == tracking.RegisteredVersion("1", reused=True)  # the same particle
    assert register(coeffs, TransformersSettings(max_new_tokens=4)).version == "2"  # served differently
    assert register(np.array([[0.5, 0.5, 0.0]]), settings).version == "3"  # another model
    assert len(MlflowClient().search_model_versions("name = 'served'")) == 3
    MlflowClient().set_registered_model_alias("served", "champion", "1")

    prompts = [json.loads(line)["question"] for path in data.values() for line in path.read_text().splitlines()[:3]]
    expected = open_generator(settings, root / "base").generate(prompts)
    port = _free_port()
    # `mlflow models serve` runs `uvicorn` from PATH: the environment's bin directory comes first
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    server = _start([sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/served@champion",
                     "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
                    env, f"http://127.0.0.1:{port}/ping", cwd=tmp_path)
    try:
        assert _json(f"http://127.0.0.1:{port}/invocations", {"inputs": prompts})["predictions"] == expected
    finally:
        _stop(server)


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
    return subprocess.Popen([sys.executable, "-c", code], env=_isolated_env(home), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _isolated_env(home, **extra):
    """A child with its own data dir: no Prefect settings inherited from this process, and no
    MLflow store (``mlflow.set_tracking_uri`` in this process exports MLFLOW_TRACKING_URI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    return {**env, "PSOMERGE_HOME": str(home), "PYTHONUNBUFFERED": "1", **extra}


def _reap(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _summary(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    line = next(ln for ln in out.splitlines() if ln.startswith("SUMMARY"))
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


def _gone(pid):
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _answers(url):
    import urllib.request

    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def test_killed_run_takes_its_temporary_prefect_server_with_it(tmp_path, char_family):
    """`kill -9` of `psomerge run` (no PREFECT_API_URL): the Prefect server it started dies too."""
    import psutil

    cfg = write_config(tmp_path / "run.yaml", char_family, "killed", steps=50, baselines=())
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    with open(tmp_path / "run.log", "wb") as out:
        run = subprocess.Popen([sys.executable, "-m", "psomerge.cli", "run", str(cfg)],
                               env=_isolated_env(tmp_path / "home"), cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    descendants = []
    try:
        deadline = time.monotonic() + 300
        while True:  # until the run's temporary Prefect server answers
            assert run.poll() is None and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[-3000:]
            descendants = psutil.Process(run.pid).children(recursive=True)
            servers = [p.cmdline() for p in descendants if "uvicorn" in " ".join(p.cmdline())]
            if servers and _answers(f"http://127.0.0.1:{servers[0][servers[0].index('--port') + 1]}/api/health"):
                break
            time.sleep(0.2)
        os.kill(run.pid, signal.SIGKILL)  # the run only, not its process group
        run.wait(timeout=30)
        deadline = time.monotonic() + 10
        while not all(_gone(p.pid) for p in descendants) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p.pid for p in descendants if not _gone(p.pid)] == []
        assert list(workdir.iterdir()) == []  # nothing written under the working directory
    finally:
        for p in [psutil.Process(run.pid) if run.poll() is None else None, *descendants]:
            if p is not None and not _gone(p.pid):
                p.kill()
        run.wait()


def _start(cmd, env, url, timeout=120, cwd=None):
    """A server in its own process group, once ``url`` answers."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=cwd)
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    _stop(proc)
    raise RuntimeError(f"{' '.join(cmd[:5])} did not start")


def _stop(proc, grace=30):
    """Stop a process group started by ``_start`` (SIGTERM, then SIGKILL)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


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


# The driver of a Ray run: records what each particle task sends to the Ray cluster (the
# types of every object pickled with it) and whether this process scored any particle itself.
RAY_DRIVER = """
import io, json
import cloudpickle
from psomerge.orchestration.settings import apply_defaults
apply_defaults()
import ray
from prefect_ray import RayTaskRunner
from psomerge import pipeline
from psomerge.orchestration.flows import run_flow

sent, crossing, cpus, scored_here = [], set(), set(), []

class Recorder(cloudpickle.Pickler):
    def reducer_override(self, obj):
        crossing.add(f"{type(obj).__module__}.{type(obj).__qualname__}")
        return super().reducer_override(obj)

submit = RayTaskRunner.submit
def recording_submit(self, task, parameters, wait_for=None, dependencies=None):
    Recorder(io.BytesIO()).dump((task, parameters))
    sent.append({k: type(v).__name__ for k, v in parameters.items()})
    cpus.add(ray.cluster_resources().get("CPU"))
    return submit(self, task, parameters, wait_for, dependencies)
RayTaskRunner.submit = recording_submit

score = pipeline.RunContext.score
def scoring_here(self, coeffs):
    scored_here.append(1)
    return score(self, coeffs)
pipeline.RunContext.score = scoring_here

if __name__ == "__main__":
    s = run_flow(CONFIG)
    print("SUMMARY" + json.dumps({"counts": s.counts.as_dict(), "sent": sent, "crossing": sorted(crossing),
                                  "cpus": sorted(cpus), "scored_here": len(scored_here)}))
"""


@pytest.mark.slow  # a Ray cluster whose 2 workers each import torch and build a basis: about a minute
def test_flow_on_local_ray_cluster_sends_only_configs_and_coefficients(tmp_path, char_family):
    """`runner: ray` with 2 workers, and no Prefect server configured: `run_flow` starts its
    temporary server, whose address the Ray workers inherit."""
    pytest.importorskip("prefect_ray")
    cfg = write_config(tmp_path / "run.yaml", char_family, "ray", steps=1, baselines=(),
                       runner={"type": "ray", "max_workers": 2})
    script = tmp_path / "run_ray.py"
    script.write_text(RAY_DRIVER.replace("CONFIG", repr(str(cfg))))
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    proc = subprocess.Popen([sys.executable, str(script)], env=_isolated_env(tmp_path / "home"), cwd=workdir,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        _reap(proc)
    assert proc.returncode == 0, out[-3000:]
    result = json.loads(next(ln for ln in out.splitlines() if ln.startswith("SUMMARY")).removeprefix("SUMMARY"))
    counts = result["counts"]
    assert counts["fitness_calls"] == 10 and counts["scorings"] + counts["cache_hits"] == 10 and counts["scorings"] > 0
    assert result["scored_here"] == 0  # every particle was scored by a Ray worker's own RunContext
    assert result["cpus"] == [2.0]  # a local cluster of 2 workers
    # one task per particle; what crossed: the config as JSON, a coefficient list, two fingerprints
    assert result["sent"] == [{"config_json": "str", "coeffs": "list", "basis_fingerprint": "str",
                               "eval_fingerprint": "str"}] * 10
    assert "prefect.tasks.Task" in result["crossing"]  # the recorder saw the task it sent
    assert not [t for t in result["crossing"] if t.split(".")[0] in ("torch", "numpy", "transformers", "safetensors")
                or t.startswith(("psomerge.pipeline", "psomerge.swarm"))], result["crossing"]
    assert list(workdir.iterdir()) == []


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


def _json(url, body=None):
    """GET (no body) or POST JSON; the JSON answer."""
    import urllib.request

    request = urllib.request.Request(url, method="POST" if body is not None else "GET",
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow  # a prefect server, a deployment and a flow run in its own process: about a minute
def test_deploy_serves_a_schedule_whose_runs_complete(tmp_path, char_family):
    """`psomerge deploy --interval` against a real `prefect server`: the server's scheduler
    creates a run, the served deployment executes it, and it completes (a registered model).
    An interval of seconds rather than a cron of minutes keeps the wait short; a cron reaches
    the deployment the same way (`test_deployment_carries_the_cron_schedule`)."""
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    server_env = _isolated_env(tmp_path / "home", PREFECT_HOME=str(tmp_path / "prefect-server"),
                               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_UI_ENABLED="false",
                               PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1")
    server = _start([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                    server_env, f"{api}/health")
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    deploy = None
    try:
        cfg = write_config(tmp_path / "run.yaml", char_family, "nightly", steps=1, baselines=())
        with open(tmp_path / "deploy.log", "wb") as out:
            deploy = subprocess.Popen([sys.executable, "-m", "psomerge.cli", "deploy", str(cfg), "--interval", "10"],
                                      env=_isolated_env(tmp_path / "home", PREFECT_API_URL=api,
                                                        PREFECT_RUNNER_POLL_FREQUENCY="2"), cwd=workdir,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 400
        completed = []
        while not completed:
            assert deploy.poll() is None and time.monotonic() < deadline, (tmp_path / "deploy.log").read_text()[-3000:]
            time.sleep(1)
            runs = _json(f"{api}/flow_runs/filter", {})
            completed = [r for r in runs if r["state_type"] == "COMPLETED"]
        deployment = _json(f"{api}/deployments/name/pso-merge/nightly")
        assert deployment["schedules"][0]["schedule"]["interval"] == 10.0
        run = completed[0]
        assert run["deployment_id"] == deployment["id"] and run["auto_scheduled"]  # created by the schedule
        assert run["parameters"] == {"config_path": str(cfg.resolve())}
        assert (tmp_path / "home" / "runs" / "nightly" / "model" / "model.safetensors").exists()
        assert list(workdir.iterdir()) == []
    finally:
        if deploy is not None:
            _stop(deploy, grace=15)
        _stop(server)


def test_deploy_without_a_prefect_server_fails_fast(tmp_path, char_family):
    cfg = write_config(tmp_path / "run.yaml", char_family, "unserved", steps=1, baselines=())
    for extra, message in (({}, "a deployment needs a Prefect server"),
                           ({"PREFECT_API_URL": f"http://127.0.0.1:{_free_port()}/api"}, "no Prefect server answers")):
        started = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "psomerge.cli", "deploy", str(cfg), "--cron", "0 3 * * *"],
                                env=_isolated_env(tmp_path / "home", COLUMNS="200", **extra), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert time.monotonic() - started < 60
    assert not (tmp_path / "home" / "prefect" / "prefect.db").exists()  # no temporary server was started


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


def test_prefect_task_cache_keeps_a_raced_particle_flagged(tmp_path, home, char_family):
    """A raced particle answered again by Prefect's task cache is still an estimate: it must
    stay flagged raced, or it would count as a complete fitness (a best, a selection candidate)."""
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner

    from psomerge.config import RunConfig
    from psomerge.orchestration.tasks import PrefectScoring
    from psomerge.swarm import member_coefficients

    root, experts, data = char_family
    cfg = RunConfig.from_dict({
        "name": "raced", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": [{"name": n, "dataset": str(p), "optimisation_size": 12, "heldout_size": 8,
                    "judge": {"type": "exact_match", "normalizer": "none"}} for n, p in data.items()],
        "generation": {"max_new_tokens": 6, "batch_size": 64},
        "optimizer": {"type": "pso", "steps": 1}, "warm_start": None, "selection": None,
        "racing": {"chunk": 4, "min_examples": 4, "confidence": None}, "baselines": [],
    })

    @flow(name="race-twice")
    def race_twice():
        with ThreadPoolTaskRunner(max_workers=1) as runner:
            scoring = PrefectScoring(cfg, runner)
            info = scoring.prepare()
            base = member_coefficients(info.k, info.groups, 0)
            target = (1.0, member_coefficients(info.k, info.groups, 1))  # perfect: the base surely cannot beat it
            return scoring.score([base], [target])[0], scoring.score([base], [target])[0]

    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    # results of this test's own: the task cache must answer the second call, never the first
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: str(tmp_path / "prefect-results")}):
        first, again = race_twice()
    assert first.raced and first.scored and first.fitness < 1.0
    assert again.task_cached and not again.scored
    assert again.raced and again.fitness == first.fitness
