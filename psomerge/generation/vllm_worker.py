"""A vLLM engine kept alive across particles, run by the vLLM environment's Python.

Standalone on purpose: it runs in `.venv-vllm` (vLLM's pins clash with Prefect's), where
psomerge is not installed, so it imports nothing from psomerge. The parent
(`psomerge.generation.vllm_backend.VLLMGenerator`) starts it as
``<vllm python> vllm_worker.py '<engine kwargs as JSON>'`` and speaks JSON lines:

    worker -> parent   {"event": "ready", "seconds": ..., "dtype": "float32", "device": "cpu"}
    parent -> worker   {"op": "load", "path": "/dev/shm/....safetensors"}
                       {"op": "generate", "prompts": [...], "max_tokens": 16, "stop": ["\\n"]}
                       {"op": "loglikelihood", "pairs": [[context ids, continuation ids], ...]}
                       {"op": "stop"}
    worker -> parent   {"ok": true, ...} or {"ok": false, "error": "..."}

Protocol lines go to the original stdout; everything vLLM prints is sent to stderr, so a
log line can never be mistaken for a reply.
"""

import json
import os
import sys
import time
import traceback


def main() -> int:
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM's own prints and its subprocesses' go to stderr
    engine_kwargs = json.loads(sys.argv[1])
    # One process: the model lives here, so a weight push is a function call on it, not a
    # serialised tensor crossing a process boundary.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    def send(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")

    start = time.perf_counter()
    try:
        from vllm import LLM, SamplingParams

        llm = LLM(**engine_kwargs)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        send({"event": "failed", "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
        return 1
    model_config = llm.llm_engine.model_config
    send({"event": "ready", "seconds": time.perf_counter() - start,
          "dtype": str(model_config.dtype).removeprefix("torch."),
          "device": str(getattr(llm.llm_engine.vllm_config.device_config, "device_type", "unknown"))})

    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        op = request.get("op")
        try:
            if op == "stop":
                send({"ok": True})
                break
            if op == "load":
                t = time.perf_counter()
                loaded = load_weights(llm, request["path"])
                send({"ok": True, "seconds": time.perf_counter() - t, "tensors": loaded})
            elif op == "generate":
                t = time.perf_counter()
                params = SamplingParams(temperature=0.0, max_tokens=int(request["max_tokens"]),
                                        stop=list(request.get("stop") or []))
                outputs = llm.generate(list(request["prompts"]), params, use_tqdm=False)
                completions = [o.outputs[0] for o in outputs]
                send({"ok": True, "seconds": time.perf_counter() - t,
                      "texts": [c.text for c in completions],
                      "tokens": sum(len(c.token_ids) for c in completions)})
            elif op == "loglikelihood":
                t = time.perf_counter()
                results = loglikelihood(llm, SamplingParams, request["pairs"])
                send({"ok": True, "seconds": time.perf_counter() - t, "results": results})
            else:
                send({"ok": False, "error": f"unknown op {op!r}"})
        except Exception as exc:  # noqa: BLE001 - the engine stays up; the parent decides
            send({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
