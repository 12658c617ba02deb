"""vLLM generation backend: one engine kept alive across particles, weights written in place.

The engine runs in the vLLM environment (``vllm_env.py``) as a worker process
(``vllm_worker.py``). A particle reaches it one of two ways (``weight_update``), chosen when
the engine starts:

- ``in_engine``: the worker holds the basis (on the GPU where it fits, else pinned host
  memory; host memory on a CPU engine) and sums each particle straight into the engine's own
  weight tensors, at the slices vLLM's loaders put each checkpoint tensor (``vllm_inplace.py``).
  Only the coefficients cross the pipe. Possible where the engine computes with its weights as
  loaded: a CUDA engine's unquantized layers; not vLLM's CPU backend, which repacks them,
  unless ``cpu_linear: plain``.
- ``shared_file``: the basis here sums the particle into a shared, memory-mapped safetensors
  file (``SharedWeights``, in /dev/shm) and the worker reloads the engine from it
  (``reload_weights``, which redoes the engine's repacking). Also how checkpoints (static
  merges) are loaded on either path.

Exactness: the sum is computed in fp32 as for the transformers backend and rounded once
to the engine's dtype; both paths give the engine the same bits (the mask layout's torch sum
reproduces the compiled kernel's), so the path is not part of the cache key. With ``dtype:
float32`` the engine runs the transformers resident model's weights; answers can still differ
where kernels round differently and two tokens' logits tie closely, which is why the backend
is part of the cache key.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from psomerge.errors import ConfigError, PsomergeError
from psomerge.io import Checkpoint
from psomerge.io.checkpoint import DTYPES
from psomerge.io.shared_weights import SharedWeights
from psomerge.generation.protocol import Continuation, GenerationStats, cut_at_stop, encode_continuations
from psomerge.generation.settings import VLLMEngineSettings, VLLMSettings
from psomerge.generation.vllm_env import vllm_env, vllm_python

log = logging.getLogger(__name__)
_DECODING, _ENGINE = VLLMSettings(), VLLMEngineSettings()  # one default per setting: the run config's
WORKER_SCRIPT = Path(__file__).with_name("vllm_worker.py")


@dataclass
class EngineTimings:
    start_seconds: float = 0.0  # engine start, once
    pushes: int = 0  # particles (and checkpoints) put into the running engine
    push_seconds: float = 0.0  # in the engine's process: summing into its weights, or reloading them
    basis_seconds: float = 0.0  # the engine's process reading the basis (in_engine, once)
    generate_seconds: float = 0.0


class VLLMWorkerError(PsomergeError):
    pass


class VLLMGenerator:
    """Greedy generation by a vLLM engine in its own process, given each particle in place.

    ``load_coefficients(basis, coeffs)`` writes a particle inside the engine where
    ``weight_update`` resolved to ``in_engine``; otherwise (and for checkpoints) ``weights`` is
    the shared file the basis writes into and ``weights_changed()`` reloads the engine from it.
    The engine starts on construction (seconds to minutes); ``weight_update`` then says which
    path runs and ``weight_update_reason`` why.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        max_new_tokens: int = _DECODING.max_new_tokens,
        stop: Sequence[str] = tuple(_DECODING.stop),
        python: str | None = _ENGINE.python,
        dtype: str = _ENGINE.dtype,
        memory_fraction: float = _ENGINE.memory_fraction,
        max_model_len: int | None = _ENGINE.max_model_len,
        enforce_eager: bool = _ENGINE.enforce_eager,
        seed: int = 0,
        engine_args: dict[str, Any] | None = None,
        startup_timeout: float = _ENGINE.startup_timeout,
        request_timeout: float = 3600.0,
        weight_update: str = _ENGINE.weight_update,
        cpu_linear: str = _ENGINE.cpu_linear,
    ):
        self.model_path = Path(model_path)
        self.max_new_tokens = max_new_tokens
        self.stop = tuple(stop)
        self.dtype = dtype
        self.request_timeout = request_timeout
        self.stats = GenerationStats()
        self.timings = EngineTimings()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._proc: subprocess.Popen | None = None
        self._weights: SharedWeights | None = None
        self._tokenizer = None
        self._requested = weight_update
        self._held_basis: str | None = None  # fingerprint of the basis the engine's process holds
        # On the CPU backend, --gpu-memory-utilization is the share of RAM reserved (KV cache).
        kwargs: dict[str, Any] = {"model": str(self.model_path), "dtype": dtype, "enforce_eager": enforce_eager,
                                  "gpu_memory_utilization": memory_fraction, "seed": seed}
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        kwargs.update(engine_args or {})
        self._start(vllm_python(python), {"engine": kwargs, "weight_update": weight_update, "cpu_linear": cpu_linear},
                    startup_timeout)

    # -- process ---------------------------------------------------------------------------

    def _start(self, python: Path, options: dict, timeout: float) -> None:
        self._log = tempfile.NamedTemporaryFile(prefix="psomerge-vllm-worker-", suffix=".log", delete=False)
        log.info("starting a vLLM engine for %s (log %s)", self.model_path, self._log.name)
        start = time.perf_counter()
        self._proc = subprocess.Popen(
            [str(python), str(WORKER_SCRIPT), json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=vllm_env(),
            start_new_session=True,  # its own group, so stopping it also stops anything it spawned
        )
        atexit.register(self.close)
        threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True).start()
        ready = self._receive(timeout, starting=True)
        if ready.get("event") != "ready":
            self.close()
            raise VLLMWorkerError(f"vLLM engine for {self.model_path} failed to start: {ready.get('error')}"
                                  f"\n{self._log_tail()}")
        self.timings.start_seconds = time.perf_counter() - start
        self.engine_dtype = ready["dtype"]
        self.device = ready.get("device", "unknown")
        self.device_name = ready.get("device_name", self.device)
        log.info("vLLM engine ready in %.1fs (%s, %s)", self.timings.start_seconds, self.engine_dtype, self.device)
        self._resolve_weight_update(ready.get("in_engine") or {})

    def _resolve_weight_update(self, probe: dict) -> None:
        """``weight_update`` as asked, against what the worker found at start (``probe``)."""
        possible, reason = bool(probe.get("possible")), probe.get("reason", "")
        if self._requested == "in_engine" and not possible:
            self.close()
            raise ConfigError(f"generation.vllm.weight_update: in_engine is not possible for the vLLM engine of "
                              f"{self.model_path}: {reason}. Use auto or shared_file")
        self.weight_update = "in_engine" if possible and self._requested != "shared_file" else "shared_file"
        self.weight_update_reason = (
            f"the engine computes with its weights as loaded ({probe.get('tensors')} checkpoint tensors mapped, "
            f"summed with {probe.get('kernel')})" if self.weight_update == "in_engine"
            else "asked for (generation.vllm.weight_update: shared_file)" if self._requested == "shared_file"
            else reason)
        log.info("vLLM weight update: %s, because %s", self.weight_update, self.weight_update_reason)

    def _read(self, stream) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)  # the worker closed its end: it exited

    def _receive(self, timeout: float, starting: bool = False) -> dict:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            self.close()
            what = "start" if starting else "answer"
            raise VLLMWorkerError(f"vLLM engine for {self.model_path} did not {what} within {timeout:.0f}s"
                                  f"\n{self._log_tail()}") from None
        if line is None:
            code = self._proc.wait() if self._proc else None
            self._proc = None
            raise VLLMWorkerError(f"vLLM engine for {self.model_path} exited (code {code})\n{self._log_tail()}")
        return json.loads(line)

    def _request(self, message: dict) -> dict:
        if self._proc is None:
            raise VLLMWorkerError(f"vLLM engine for {self.model_path} is not running")
        try:
            self._proc.stdin.write(json.dumps(message) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # it died; _receive reports how, with its log
        reply = self._receive(self.request_timeout)
        if not reply.get("ok"):
            raise VLLMWorkerError(f"vLLM engine for {self.model_path}: {message['op']} failed: {reply.get('error')}")
        return reply

    def _log_tail(self, chars: int = 3000) -> str:
        try:
            return f"--- {self._log.name} (last lines) ---\n" + Path(self._log.name).read_text()[-chars:]
        except OSError:
            return ""

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                proc.stdin.flush()
                proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._weights is not None:
            self._weights.close()
            self._weights = None

    # -- weights and generation ----------------------------------------------------------------

    @property
    def weights(self) -> SharedWeights:
        """The shared file a particle is written into: the base's floating tensors, in the
        engine's dtype, in the checkpoint's own names."""
        if self._weights is None:
            ref = Checkpoint(self.model_path)
            plan = [(n, ref.info(n).shape) for n in ref.tensor_names if ref.info(n).dtype.is_floating_point]
            ref.close()
            self._weights = SharedWeights(plan, DTYPES[self.engine_dtype])
        return self._weights

    def weights_changed(self) -> None:
        """Reload the running engine from ``weights`` (after a particle was written there)."""
        reply = self._request({"op": "load", "path": str(self.weights.path)})
        self.timings.pushes += 1
        self.timings.push_seconds += reply["seconds"]

    def load_coefficients(self, basis, coeffs: np.ndarray) -> bool:
        """Write the particle ``coeffs`` of ``basis`` inside the engine (the in-engine path):
        the basis is sent once (its spec: the engine's process reads the members itself), then
        only coefficients. False where particles go through ``weights`` instead."""
        if self.weight_update != "in_engine":
            return False
        if basis.spec is None or not basis.sums_like_masks:
            why = ("the basis was not built by build_basis (no spec)" if basis.spec is None
                   else f"basis.storage {basis.storage!r} sums with other roundings than the engine's mask layout")
            if self._requested == "in_engine":
                raise ConfigError(f"generation.vllm.weight_update: in_engine: {why}")
            log.warning("vLLM weight update: shared_file, because %s", why)
            self.weight_update, self.weight_update_reason = "shared_file", why
            return False
        if self._held_basis != basis.fingerprint:
            reply = self._request({"op": "basis", "spec": basis.spec, "storage": basis.storage})
            self._held_basis = basis.fingerprint
            self.timings.basis_seconds += reply["seconds"]
            log.info("vLLM engine holds the basis (%s, %.2f GiB) after %.1fs", reply["storage"],
                     reply["nbytes"] / 2**30, reply["seconds"])
        reply = self._request({"op": "particle", "coefficients": np.asarray(coeffs, dtype=np.float64).tolist()})
        self.timings.pushes += 1
        self.timings.push_seconds += reply["seconds"]
        return True

    def weights_digest(self) -> str:
        """sha256 of every engine parameter: what it computes with (for checks)."""
        return self._request({"op": "weights_digest"})["digest"]

    def generate(self, prompts: Sequence[str], *, stop: Sequence[str] | None = None,
                 max_new_tokens: int | None = None) -> list[str]:
        stop = self.stop if stop is None else tuple(stop)
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        reply = self._request({"op": "generate", "prompts": list(prompts), "max_tokens": max_new_tokens,
                               "stop": list(stop)})
        self.timings.generate_seconds += reply["seconds"]
        self.stats.calls += 1
        self.stats.prompts += len(prompts)
        self.stats.new_tokens += int(reply["tokens"])
        return [cut_at_stop(t, stop) for t in reply["texts"]]

    def loglikelihood(self, requests: Sequence[tuple[str, str]], append_eos: bool = False) -> list[Continuation]:
        """Tokenised here as the transformers backend does, scored by the engine's prompt log-probs."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        pairs = encode_continuations(self._tokenizer, requests, append_eos)
        reply = self._request({"op": "loglikelihood", "pairs": pairs})
        self.timings.generate_seconds += reply["seconds"]
        return [Continuation(float(lp), int(n), int(g)) for lp, n, g in reply["results"]]
