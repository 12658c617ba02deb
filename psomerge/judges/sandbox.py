"""Running an untrusted Python program: contained by the kernel, judged by a marker.

Containment (``sandbox_init.py`` builds it; bubblewrap or, as root, namespaces by hand):
fresh mount, PID, network, IPC, UTS and cgroup namespaces; the host's files read-only;
``/proc`` and ``/dev/shm`` empty; one writable place, ``/tmp`` (the working directory), a
private tmpfs whose size is the program's whole disk quota; rlimits on CPU, memory, file
size and processes; when started as root, a user id of its own per run, from a range no
account uses (it owns no file, and one run's processes never count against another's process
limit); no new privileges; a seccomp filter against the ptrace family. The harness is the
namespace's PID 1, so every process a program starts dies with it, and a run never waits on
a leftover.

Pass = the tests returned. The scorer sends the harness a fresh random secret on stdin, with
the program; the harness reads both before any program code exists, writes ``S`` on a
result pipe, and writes the secret there only after ``exec`` of the program (its tests
included) returned normally. The secret is held only inside C iterators (no name, frame or
module refers to it), and an audit hook refuses the ways Python code could reach it anyway
(garbage-collector walks, tracing, code-object construction, ctypes). Exit statuses mean
nothing: ``sys.exit(0)``, ``os._exit(0)``, an ``atexit`` hook or a replaced ``sys.excepthook``
before the tests leave no secret, hence a fail. No ``S`` means the sandbox or the interpreter
never started the program: a ``SandboxError``, never a score.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import platform
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from psomerge.errors import PsomergeError
from psomerge.judges.sandbox_init import seccomp_filter

log = logging.getLogger(__name__)

RUN_UIDS = range(2_000_000_000, 2_000_000_000 + 65536)  # one per run, in turn; no account's
_run_counter = itertools.count()
INIT = Path(__file__).with_name("sandbox_init.py")
PROBE_TIMEOUT = 30.0

# Runs first in the sandboxed interpreter (``python -I -S -B -c HARNESS RESULT_FD``).
HARNESS = r'''# psomerge sandbox harness
import collections, itertools, os, sys

def _guard():
    # closure values only: nothing the program can rebind (globals, builtins) is read at call time
    denied = frozenset(("gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys._current_frames",
                        "sys.settrace", "sys.setprofile", "sys.monitoring.register_callback", "code.__new__"))
    denied_modules = ("ctypes", "_ctypes", "_test", "_xx", "_interp")
    startswith, exact, error = str.startswith, str.__str__, PermissionError

    def guard(event, args):
        if event in denied or startswith(event, "ctypes."):
            raise error("sandbox: " + event + " is not allowed")
        if event == "import" and startswith(exact(args[0]), denied_modules):
            raise error("sandbox: importing " + exact(args[0]) + " is not allowed")
    return guard

sys.addaudithook(_guard())
del _guard

def _plan(result_fd):
    job = bytearray()
    chunk = os.read(0, 1 << 16)
    while chunk:
        job += chunk
        chunk = os.read(0, 1 << 16)
    secret, _, source = bytes(job).partition(b"\n")
    os.write(result_fd, b"S")
    code = compile(source, "program.py", "exec")
    return itertools.chain(itertools.starmap(exec, ((code, {"__name__": "__main__"}),)),
                           itertools.starmap(os.write, ((result_fd, secret),)),
                           itertools.starmap(os._exit, ((0,),)))

collections.deque(_plan(int(sys.argv[1])), 0)
'''


class SandboxError(PsomergeError):
    """The sandbox cannot run programs here, or could not start one: never a score."""

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int
    memory_bytes: int
    file_bytes: int
    processes: int
    disk_bytes: int


@dataclass(frozen=True)
class RunOutcome:
    status: str  # passed | failed | timeout
    returncode: int | None
    stderr: str


@dataclass(frozen=True)
class Sandbox:
    """One way of running programs (``mode`` ``bwrap`` with the bubblewrap at ``bwrap``, or
    ``unshare``) with one interpreter, dropping root (``drop_root``) to a fresh user id per run;
    ``run`` runs one program under ``limits``."""

    mode: str
    python: str
    drop_root: bool
    bwrap: str | None = None

    def describe(self) -> str:
        return f"bubblewrap ({self.bwrap})" if self.mode == "bwrap" else "namespaces by hand (unshare, as root)"

    def run(self, source: str, limits: Limits, timeout: float) -> RunOutcome:
        secret = secrets.token_hex(32).encode()
        result_r, result_w = os.pipe()
        uid = RUN_UIDS[next(_run_counter) % len(RUN_UIDS)] if self.drop_root else None
        spec = {"mode": self.mode, "bwrap": self.bwrap, "uid": uid,
                "argv": [self.python, "-I", "-S", "-B", "-c", HARNESS, str(result_w)],
                "env": {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
                "cpu": limits.cpu_seconds, "address_space": limits.memory_bytes, "file_size": limits.file_bytes,
                "processes": limits.processes, "disk": limits.disk_bytes}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(INIT), json.dumps(spec)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    pass_fds=(result_w,), env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        finally:
            os.close(result_w)
        try:
            timed_out, err = _communicate(proc, secret + b"\n" + source.encode(), timeout)
            report = _read_report(result_r)
        finally:
            os.close(result_r)
        stderr = err.decode(errors="replace")
        if secret in report:
            return RunOutcome("passed", proc.returncode, stderr)
        if not report.startswith(b"S"):
            what = "did not start the program within the timeout" if timed_out else "could not start the program"
            detail = f"{what}: {stderr.strip()[-800:] or f'exit status {proc.returncode}'}"
            raise SandboxError(f"code sandbox ({self.describe()}, python {self.python}) {detail}", detail)
        return RunOutcome("timeout" if timed_out else "failed", None if timed_out else proc.returncode, stderr)


def _communicate(proc: subprocess.Popen, job: bytes, timeout: float) -> tuple[bool, bytes]:
    """Send the job, collect stderr; on timeout kill the launcher (its namespace dies with it)."""
    try:
        _, err = proc.communicate(job, timeout=timeout)
        return False, err
    except subprocess.TimeoutExpired:
        for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        _, err = proc.communicate()
        return True, err


def _read_report(fd: int, wait: float = 2.0) -> bytes:
    """What the harness (and the program) wrote on the result pipe, until EOF; every writer
    is gone by now, ``wait`` only bounds the kernel's tearing down of the namespace."""
    data = bytearray()
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    return bytes(data)


# -- choosing a sandbox that works here, once per process --------------------------------
_LOCK = threading.Lock()


def sandbox_for(use_bwrap: bool, limits: Limits) -> Sandbox:
    """The sandbox to run programs with, checked by a probe run (once per process and
    settings): bubblewrap when asked for and usable, else namespaces by hand (as root) with a
    warning; a ``SandboxError`` naming what is wrong when neither works."""
    with _LOCK:
        return _probed(use_bwrap, shutil.which("bwrap") if use_bwrap else None, limits)


@functools.cache
def _probed(use_bwrap: bool, bwrap: str | None, limits: Limits) -> Sandbox:
    python, drop_root = _interpreter()
    failures = []
    candidates = [Sandbox("bwrap", python, drop_root, bwrap)] if bwrap else []
    candidates.append(Sandbox("unshare", python, drop_root))
    for sandbox in candidates:
        reason = _probe(sandbox, limits)
        if reason is None:
            if failures:
                log.warning("code sandbox: %s; falling back to %s", "; ".join(failures), sandbox.describe())
            if not seccomp_filter():
                log.warning("code sandbox: no seccomp syscall table for %s: a program's child processes could "
                            "ptrace the harness and read its pass marker", platform.machine())
            return sandbox
        failures.append(f"{sandbox.describe()} does not work here: {reason}")
    if use_bwrap and not bwrap:
        failures.insert(0, "bubblewrap (bwrap) is not installed")
    raise SandboxError("code_exec: no sandbox can run a trivial program on this machine under these limits "
                       f"(memory {limits.memory_bytes >> 20} MB): " + "; ".join(failures) + ". It needs a working "
                       "bubblewrap, or root where namespaces and mounts are allowed.")


def _probe(sandbox: Sandbox, limits: Limits) -> str | None:
    """Why ``sandbox`` cannot run a trivial program, or None when it can."""
    if sandbox.mode == "unshare" and os.geteuid() != 0:
        return "it needs root"
    try:
        outcome = sandbox.run("pass\n", limits, PROBE_TIMEOUT)
    except SandboxError as exc:
        return exc.detail
    if outcome.status != "passed":
        return f"a trivial program {outcome.status}: {outcome.stderr.strip()[-500:]}"
    return None


def _interpreter() -> tuple[str, bool]:
    """The Python to run programs with, and whether to drop root for them.

    As root, programs run as a user of their own, with an interpreter any user can execute
    (this one may live under a private home); with none, the sandbox refuses to run rather
    than run untrusted code as root.
    """
    if os.geteuid() != 0:
        return sys.executable, False
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and _world_executable(candidate):
            return candidate, True
    raise SandboxError(f"code_exec: no Python interpreter that any user can execute (tried {sys.executable}, "
                       "python3 on PATH, /usr/bin/python3); untrusted code never runs as root")


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
