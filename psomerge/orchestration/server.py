"""The Prefect API a psomerge process talks to: the configured server (``PREFECT_API_URL``,
or a Prefect profile naming one), else a temporary local server that dies with this process.

Prefect's own temporary server is stopped by an atexit hook only: a run killed with SIGKILL
left it running for good. psomerge starts the same server (Prefect's API app under uvicorn,
SQLite under ``PREFECT_HOME``) itself, as a child that the kernel kills when this process
dies, however it dies (``PR_SET_PDEATHSIG`` on Linux), and stops it at a normal exit. Its
URL is exported as ``PREFECT_API_URL``, so Dask and Ray workers started later report to it
too instead of each starting a server of its own.

The server dies with the *thread* that started it (that is how the kernel tracks a parent):
start it from the main thread, as the command line does.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from psomerge.errors import PsomergeError

log = logging.getLogger(__name__)

# Runs in the child: ask the kernel for SIGKILL when the parent dies, then become the server.
# prctl(PR_SET_PDEATHSIG) survives exec; a parent that died before the call is caught by getppid.
_LAUNCHER = """\
import ctypes, os, signal, sys
prctl = getattr(ctypes.CDLL(None), "prctl", None)  # Linux only
if prctl is not None:
    prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != int(sys.argv[1]):
        sys.exit(1)
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""

_server: TemporaryServer | None = None


class PrefectServerError(PsomergeError):
    """No usable Prefect API."""


class TemporaryServer:
    """Prefect's API app under uvicorn on a free loopback port, tied to this process."""

    def __init__(self, home: Path, startup_timeout: float):
        self.log_path = home / "temporary-server.log"
        home.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a port taken between choosing and binding: the server exits; choose again
            self.port = _free_port()
            self.proc = self._spawn()
            if self._wait_healthy(startup_timeout):
                return
            if self.proc.poll() is None:  # still starting after the timeout
                self.stop()
                break
        raise PrefectServerError(f"the temporary Prefect server did not answer within {startup_timeout:g} s "
                                 f"(exit code {self.proc.returncode}); its log: {self.log_path}")

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-c", _LAUNCHER, str(os.getpid()), "-m", "uvicorn", "--factory",
               "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "error", "--lifespan", "on"]
        from prefect.settings import get_current_settings

        # as Prefect starts its own temporary server: this process's settings (a profile's too), no
        # UI, the services an ephemeral server runs
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
               "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1", "PREFECT_SERVER_UI_ENABLED": "false"}
        env.pop("PREFECT_API_URL", None)
        with open(self.log_path, "ab") as out:
            # its own session: a Ctrl-C in the terminal reaches the run, which then stops the server
            # after Prefect has reported the run's state to it
            return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def _wait_healthy(self, timeout: float) -> bool:
        """Whether the server answers before ``timeout``; False at once if it exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if reachable(self.api_url, timeout=1):
                return True
            time.sleep(0.1)
        return False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def reachable(api_url: str, timeout: float = 5.0) -> bool:
    """Whether a Prefect API answers its health check."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError, ValueError):
        return False


def configured_api_url() -> str | None:
    """The Prefect API configured by the environment or the active Prefect profile."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


def ensure_api() -> str:
    """The Prefect API URL this process uses: the configured one, else that of a temporary
    server started now (once per process, stopped at exit, killed with this process)."""
    global _server
    url = configured_api_url()
    ours_died = _server is not None and url == _server.api_url and not _server.alive()
    if url and not ours_died:
        return url
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    _server = TemporaryServer(Path(settings.home), settings.server.ephemeral.startup_timeout_seconds)
    atexit.register(_server.stop)  # after Prefect's own exit hooks (registered later, run first) drained to it
    log.info("temporary Prefect server at %s (log: %s)", _server.api_url, _server.log_path)
    os.environ["PREFECT_API_URL"] = _server.api_url  # child processes (Dask, Ray workers) inherit it
    refresh_global_settings_context()  # and Prefect, already imported, reads it again
    return _server.api_url


def require_api() -> str:
    """The configured Prefect API, answering; an error saying what to do otherwise (a
    deployment needs a server that outlives this process)."""
    url = configured_api_url()
    if not url:
        raise PrefectServerError("a deployment needs a Prefect server: start one (`prefect server start`) and set "
                                 "PREFECT_API_URL=http://HOST:4200/api")
    if not reachable(url):
        raise PrefectServerError(f"no Prefect server answers at PREFECT_API_URL={url} (GET {url.rstrip('/')}/health "
                                 "failed): start it (`prefect server start`) or fix the URL")
    return url


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
