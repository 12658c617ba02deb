"""Judging through a real vLLM OpenAI-compatible server that psomerge starts and stops.

Needs the separate vLLM environment: `make test-vllm` builds it (`make vllm-env`) and runs this.
"""

from pathlib import Path

import pytest
import torch

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="vLLM environment absent: run `make test-vllm`")


def test_llm_judge_through_vllm_server(tmp_path):
    from transformers import LlamaForCausalLM

    from psomerge.presets.charlm import char_tokenizer, tiny_llama_config
    from psomerge.presets.tiny_tasks import ALPHABET
    from psomerge.judges.llm import LLMJudge
    from psomerge.judges.protocol import Example

    tok = char_tokenizer(ALPHABET + "ABCDEFGHIJKLMNOPQRSTUVWXYZ.,:'()?!\n-")
    config = tiny_llama_config(len(tok), hidden=256, layers=4, heads=4)
    config.max_position_embeddings = 2048
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")

    judge = LLMJudge(model="tiny-judge", max_tokens=8, on_unparseable="zero", max_retries=0, timeout=120,
                     serve={"model_path": str(tmp_path / "tiny"), "python": str(VLLM_PYTHON)})
    try:
        examples = [Example(str(i), f"add {i}+{i}=", str(2 * i)) for i in range(3)]
        scores = judge.score(examples + examples[:1], ["2", "4", "5", "2"])
        assert len(scores) == 4 and all(0.0 <= s.value <= 1.0 for s in scores)
        assert judge.stats.requests >= 3 and judge.stats.deduplicated == 1
        assert judge.stats.prompt_tokens > 0 and judge.stats.errors == 0
        server = judge._server
        assert server is not None and server._proc.poll() is None
    finally:
        judge.close()
    assert server._proc is None


def _config(root, experts, data, tmp_path, backend: str, **generation):
    from psomerge.config import RunConfig

    return RunConfig.from_dict({
        "name": f"vllm-{backend}", "preset": "paper", "base": str(root / "base"), "experts": [str(e) for e in experts],
        "suites": [{"name": n, "dataset": str(p), "optimisation_size": 12, "heldout_size": 12,
                    "judge": {"type": "exact_match", "normalizer": "none"}} for n, p in data.items()],
        "generation": {"backend": backend, "max_new_tokens": 6, **generation},
        "optimizer": {"type": "pso", "steps": 1}, "baselines": [],
        "output_dir": str(tmp_path / backend), "cache_path": str(tmp_path / "fitness.sqlite"),
    })


@pytest.fixture(scope="module")
def vllm_family(tmp_path_factory):
    """The char family with head_dim 32: vLLM's CPU attention has no kernel for 16."""
    from conftest import make_char_family

    return make_char_family(tmp_path_factory.mktemp("vllmfam"), hidden=64, heads=2)


def test_vllm_generation_backend_reloads_particles_into_one_engine(vllm_family, tmp_path, monkeypatch):
    """Particles pushed into one running engine give the transformers backend's answers."""
    import os
    import signal

    import numpy as np

    from psomerge.generation.vllm_backend import VLLMWorkerError
    from psomerge.pipeline import RunContext, run_swarm
    from psomerge.swarm.fitness import load_particle

    root, experts, data = vllm_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    monkeypatch.setenv("PSOMERGE_VLLM_PYTHON", str(VLLM_PYTHON))
    ws_t = RunContext(_config(root, experts, data, tmp_path, "transformers"))
    cfg_v = _config(root, experts, data, tmp_path, "vllm", vllm={"dtype": "float32"})
    ws_v = RunContext(cfg_v)
    try:
        prompts = [ex.prompt for s in ws_t.suites for ex in s.split("optimisation")]
        rng = np.random.default_rng(0)
        particles = [np.eye(ws_v.basis.k)[[j]] for j in range(3)] + [rng.normal(0.3, 0.4, (1, ws_v.basis.k))]
        with ws_v.evaluator.resident() as rv, ws_t.evaluator.resident() as rt:
            engine = rv
            pid = engine._proc.pid
            for x in particles:
                load_particle(rv, ws_v.basis, x)
                load_particle(rt, ws_t.basis, x)
                assert rv.generate(prompts) == rt.generate(prompts)
                # likelihoods through the engine's prompt log-probs equal the transformers forward pass
                pairs = [(ex.prompt, ex.answer) for s in ws_t.suites for ex in s.split("optimisation")[:6]]
                for a, b in zip(rv.loglikelihood(pairs, append_eos=True), rt.loglikelihood(pairs, append_eos=True)):
                    assert (a.tokens, a.greedy_tokens) == (b.tokens, b.greedy_tokens)
                    assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-4)
        assert engine._proc.pid == pid and engine.timings.pushes == len(particles)  # never restarted
        assert engine.timings.start_seconds > engine.timings.push_seconds / len(particles)
        assert engine.stats.new_tokens > 0

        # a whole run on the vLLM backend, with its own cache entries
        run = run_swarm(cfg_v, context=ws_v)
        assert run.counts.scorings > 0 and run.counts.generated_tokens > 0
        assert [label for label, _ in run.heldout][-1] == "psomerge:pso"
        assert len(ws_v.evaluator.residents) == 1 and engine.timings.pushes > len(particles)

        # an engine that dies is reported with its log, not hung on
        os.killpg(engine._proc.pid, signal.SIGKILL)
        with pytest.raises(VLLMWorkerError, match="exited"):
            engine.generate(prompts[:2])
    finally:
        weights = ws_v.evaluator.residents[0].weights.path if ws_v.evaluator.residents else None
        ws_v.close()
        ws_t.close()
    assert weights is None or not weights.exists()  # the shared file is removed with the engine


def test_vllm_engine_that_cannot_start_names_the_model(vllm_family, tmp_path):
    from psomerge.generation.vllm_backend import VLLMGenerator, VLLMWorkerError

    root, _, _ = vllm_family
    with pytest.raises(VLLMWorkerError, match=r"(?s)failed to start.*max_model_len|failed to start.*max-model-len"):
        VLLMGenerator(root / "base", python=str(VLLM_PYTHON), max_model_len=10**7, startup_timeout=300)
