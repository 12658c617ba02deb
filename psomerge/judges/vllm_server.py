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
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from psomerge.errors import ConfigError, PsomergeError
from psomerge.generation.vllm_env import vllm_env, vllm_python
from psomerge.yamlconfig import StrictModel

log = logging.getLogger(__name__)

# A plain chat template for models that ship none (vLLM refuses chat requests without one).
PLAIN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}assistant:"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeSettings(StrictModel):
    """A vLLM server psomerge starts for an LLM judge (the judge's ``serve`` section)."""

    model_path: Path
    python: Path | None = None  # see vllm_python()
    port: int | None = Field(None, gt=0, lt=65536)  # default: a free port
    dtype: str = "bfloat16"
    max_model_len: int = Field(2048, gt=0)
    memory_fraction: float = Field(0.2, gt=0, le=1)  # --gpu-memory-utilization: on the CPU backend, the share of RAM
    startup_timeout: float = Field(600.0, gt=0)
    extra_args: list[str] = Field(default_factory=list)
    chat_template: Path | None = None  # a file; a plain template is used when the model has none

    def check_paths(self, key: str) -> None:
        """The model folder, chat template and vLLM environment exist (``key`` names the section)."""
        if not self.model_path.is_dir():
            raise ConfigError(f"key '{key}.model_path': model folder {self.model_path} does not exist")
        if self.chat_template is not None and not self.chat_template.is_file():
            raise ConfigError(f"key '{key}.chat_template': file {self.chat_template} does not exist")
        try:
            vllm_python(self.python)
        except ConfigError as exc:
            raise ConfigError(f"key '{key}.python': {exc}") from None


@dataclass
class VLLMServer:
    settings: ServeSettings
    served_name: str = "judge"
    port: int | None = None  # the settings' port, else a free one when started
    _proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "VLLMServer":
        s = self.settings
        python = vllm_python(s.python)
        self.port = s.port or self.port or _free_port()
        template = str(s.chat_template) if s.chat_template else None
        if template is None and not _has_chat_template(s.model_path):
            fd, template = tempfile.mkstemp(suffix=".jinja")
            os.write(fd, PLAIN_CHAT_TEMPLATE.encode())
            os.close(fd)
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(s.model_path),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--dtype", s.dtype, "--max-model-len", str(s.max_model_len), "--enforce-eager",
               "--gpu-memory-utilization", str(s.memory_fraction),
               *(["--chat-template", template] if template else []), *s.extra_args]
        env = vllm_env()
        self._log = tempfile.NamedTemporaryFile(prefix="vllm-", suffix=".log", delete=False)
        log.info("starting vLLM on %s (log %s)", self.url, self._log.name)
        self._proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        atexit.register(self.stop)  # its own session: it would outlive this process otherwise
        deadline = time.monotonic() + s.startup_timeout
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
        raise PsomergeError(f"vLLM did not answer on {self.url} within {s.startup_timeout:.0f}s; see {self._log.name}")

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
