"""Code execution scorer (HumanEval / MBPP style): run program + tests, pass = exit 0.

Each program runs in a fresh subprocess, in its own temporary directory, with layered
containment, so a hostile program scores 0 and leaves the host alone:
- wall-clock timeout, then the whole process group (or PID namespace) is killed;
- rlimits: CPU seconds, address space, file size, process count;
- an environment with nothing of the host's (no secrets, no tokens);
- when running as root: its own network namespace and the unprivileged ``nobody`` user;
- bubblewrap, when installed: read-only root, private /tmp, no network, own PID namespace;
- inside Python: an audit hook that refuses writes outside the working directory, sockets,
  and new processes, before the untrusted code starts.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field

from psomerge.judges.protocol import Example, Score, ScorerBase
from psomerge.templates import field_validator_for, fill
from psomerge.yamlconfig import StrictModel, validate

HUMANEVAL_TEMPLATE = "{prompt}{answer}\n\n{test}\n\ncheck({entry_point})\n"
MBPP_TEMPLATE = "{answer}\n\n{test_setup_code}\n{tests}\n"
NOBODY = 65534
CLONE_NEWNET = 0x40000000

# Runs before the untrusted program, inside the sandboxed interpreter.
_GUARD = textwrap.dedent('''
    import os, sys
    _root = os.path.realpath(os.getcwd())
    _allowed_prefixes = (_root + os.sep,)
    def _guard(event, args):
        if event == "open":
            path, mode = args[0], args[1]
            if isinstance(path, int) or mode is None:
                return
            if any(c in str(mode) for c in "wax+"):
                real = os.path.realpath(path if isinstance(path, str) else os.fsdecode(path))
                if real != _root and not real.startswith(_allowed_prefixes):
                    raise PermissionError(f"sandbox: writing outside the working directory: {path}")
        elif event in ("socket.connect", "socket.bind", "socket.sendto", "socket.getaddrinfo"):
            raise PermissionError("sandbox: no network")
        elif event in ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
                       "os.forkpty", "pty.spawn", "ctypes.dlopen", "os.kill", "os.killpg"):
            raise PermissionError(f"sandbox: {event} is not allowed")
        elif event in ("os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.chmod", "os.chown",
                       "os.truncate", "os.symlink", "os.link", "os.mkdir"):
            target = args[0] if args else ""
            if isinstance(target, (str, bytes, os.PathLike)):
                real = os.path.realpath(os.fsdecode(target))
                if not real.startswith(_allowed_prefixes):
                    raise PermissionError(f"sandbox: {event} outside the working directory")
    sys.addaudithook(_guard)
    del _guard
    _code = open("program.py").read()
    exec(compile(_code, "program.py", "exec"), {"__name__": "__main__"})
''')


@dataclass(frozen=True)
class RunOutcome:
    status: str  # passed | failed | timeout
    returncode: int | None
    stderr: str


class CodeExecSettings(StrictModel):
    type: Literal["code_exec"] = "code_exec"
    program_template: str = HUMANEVAL_TEMPLATE
    timeout: float = Field(5.0, gt=0)
    memory_mb: int = Field(512, gt=0)
    max_file_mb: int = Field(16, gt=0)
    max_processes: int = Field(64, gt=0)
    workers: int = Field(2, gt=0)
    use_bwrap: bool = True

    check_templates = field_validator_for("program_template")


class CodeExec(ScorerBase):
    """pass@1 of (program template filled with the example's fields and the answer)."""

    name = "code_exec"

    def __init__(self, settings: CodeExecSettings | None = None, **fields: Any):
        self.settings = settings or validate(CodeExecSettings, fields, "code_exec")

    def config(self) -> dict[str, Any]:
        s = self.settings
        return {"type": self.name, "program_template": s.program_template, "timeout": s.timeout,
                "memory_mb": s.memory_mb}

    def program(self, example: Example, answer: str) -> str:
        fields = {"prompt": example.prompt, **example.fields, "answer": answer}
        if "test_list" in fields and "tests" not in fields:
            fields["tests"] = "\n".join(fields["test_list"])
        fields.setdefault("test_setup_code", "")
        return fill(self.settings.program_template, fields, what="code_exec: program_template",
                    record=f"example {example.id!r}")

    def score(self, examples: Sequence[Example], answers: Sequence[str]) -> list[Score]:
        programs = [self.program(ex, a) for ex, a in zip(examples, answers)]
        with ThreadPoolExecutor(max_workers=self.settings.workers) as pool:
            outcomes = list(pool.map(self.run, programs))
        return [Score(float(o.status == "passed"), {"status": o.status, "stderr": o.stderr[-500:]}) for o in outcomes]

    # -- the sandbox ------------------------------------------------------------------
    def run(self, program: str) -> RunOutcome:
        workdir = tempfile.mkdtemp(prefix="psomerge-exec-")
        try:
            with open(os.path.join(workdir, "program.py"), "w") as f:
                f.write(program)
            with open(os.path.join(workdir, "guard.py"), "w") as f:
                f.write(_GUARD)
            python, drop_to_nobody = _interpreter()
            if drop_to_nobody:
                os.chown(workdir, NOBODY, NOBODY)
            cmd = [python, "-I", "-S", "-B", "guard.py"]
            bwrap = shutil.which("bwrap") if self.settings.use_bwrap else None
            if bwrap:
                cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
                       "--bind", workdir, workdir, "--chdir", workdir, "--unshare-net", "--unshare-pid",
                       "--unshare-ipc", "--die-with-parent", "--new-session", *cmd]
            env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, start_new_session=True,
                                    preexec_fn=self._limits(os.geteuid() == 0, drop_to_nobody))
            try:
                _, err = proc.communicate(timeout=self.settings.timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                return RunOutcome("timeout", None, "")
            _kill_group(proc)  # leftovers a program forked into its group
            status = "passed" if proc.returncode == 0 else "failed"
            return RunOutcome(status, proc.returncode, err.decode(errors="replace"))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def _limits(self, as_root: bool, drop_to_nobody: bool):
        cpu = int(self.settings.timeout) + 1
        mem = self.settings.memory_mb * 1024**2
        fsize = self.settings.max_file_mb * 1024**2
        nproc = self.settings.max_processes

        def apply() -> None:  # runs in the child between fork and exec
            if as_root:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.unshare(CLONE_NEWNET)  # best effort: no interface but a down loopback
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
            resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if drop_to_nobody:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)  # RLIMIT_NPROC binds only non-root users
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))

        return apply


def _interpreter() -> tuple[str, bool]:
    """The Python to run untrusted code with, and whether to drop root to ``nobody`` for it.

    As root, prefer an interpreter that ``nobody`` can execute (this one may live under a
    private home), so the process-count limit binds; without one, stay root and rely on the
    other layers.
    """
    if os.geteuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and _world_executable(candidate):
            return candidate, True
    return sys.executable, False


def _world_executable(path: str) -> bool:
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.stat(real).st_mode & 0o001:
        return False
    parent = os.path.dirname(real)
    while True:
        if not os.stat(parent).st_mode & 0o001:
            return False
        if parent == "/":
            return True
        parent = os.path.dirname(parent)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
