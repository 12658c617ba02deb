"""Start and stop a vLLM OpenAI-compatible server (a judge) in the vLLM environment
(``psomerge.generation.vllm_env``); psomerge talks to it over HTTP on loopback."""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from psomerge.errors import PsomergeError
from psomerge.generation.vllm_env import vllm_env, vllm_python

log = logging.getLogger(__name__)

# A plain chat template for models that ship none (vLLM refuses chat requests without one).
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}assistant:"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    model_path: str
    served_name: str = "judge"
    python: str | None = None  # see vllm_python()
    port: int | None = None
    dtype: str = "bfloat16"
    max_model_len: int = 2048
    memory_fraction: float = 0.2  # --gpu-memory-utilization: on the CPU backend, the share of RAM reserved
    startup_timeout: float = 600.0
    extra_args: list[str] = field(default_factory=list)
    chat_template: str | None = None  # a file; a plain template is used when the model has none
    _proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "VLLMServer":
        python = vllm_python(self.python)
        self.port = self.port or _free_port()
        template = self.chat_template
        if template is None and not _has_chat_template(Path(self.model_path)):
            fd, template = tempfile.mkstemp(suffix=".jinja")
            os.write(fd, PLAIN_CHAT_TEMPLATE.encode())
            os.close(fd)
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_path,
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", self.dtype, "--max-model-len", str(self.max_model_len), "--enforce-eager",
               "--gpu-memory-utilization", str(self.memory_fraction),
               *(["--chat-template", template] if template else []), *self.extra_args]
        env = vllm_env()
        self._log = tempfile.NamedTemporaryFile(prefix="vllm-", suffix=".log", delete=False)
        log.info("starting vLLM on %s (log %s)", self.url, self._log.name)
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)  # its own session: it would outlive this process otherwise
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PsomergeError(f"vLLM exited with {self._proc.returncode} while starting; see {self._log.name}:\n"
                                    + Path(self._log.name).read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as r:
                    if r.status == 200 and json.load(r)["data"]:
                        return self
            except OSError:
                time.sleep(1)
        self.stop()
        raise PsomergeError(f"vLLM did not answer on {self.url} within {self.startup_timeout:.0f}s; see {self._log.name}")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> "VLLMServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _has_chat_template(model_dir: Path) -> bool:
    if (model_dir / "chat_template.jinja").exists():
        return True
    cfg = model_dir / "tokenizer_config.json"
    return cfg.exists() and "chat_template" in json.loads(cfg.read_text())
