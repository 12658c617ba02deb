"""Running an untrusted Python program: contained by the kernel, judged by a marker.

Containment (``sandbox_init.py`` builds it; bubblewrap or, as root, namespaces by hand):
fresh mount, PID, network, IPC, UTS and cgroup namespaces; the host's files read-only;
``/proc`` and ``/dev/shm`` empty; one writable place, ``/tmp`` (the working directory), a
private tmpfs whose size is the program's whole disk quota; rlimits on CPU, memory, file
size, open files and processes; when started as root, a user id of its own per run, from a
range no account uses (it owns no file, and one run's processes never count against another's
process limit); no new privileges; a seccomp filter against the ptrace family, sockets other
than IP and netlink (a Unix socket reaches host services through the read-only mount, vsock
the hypervisor's host), io_uring, memfd and SysV shared memory, new namespaces and mounts.
The harness is the namespace's PID 1 (or bubblewrap's child of it), so every process a
program starts dies with it, and a run never waits on a leftover. While it runs, the scorer
watches the memory the run's processes hold together (``memory_bytes`` is the run's, not each
process's: a program forking 64 processes of ``memory_bytes`` each is stopped) and keeps only
the end of its stderr.

Pass = the tests returned. The scorer sends the harness a fresh random secret on stdin, with
the program; the harness reads both before any program code exists, writes ``S`` on a
result pipe, and writes the secret there only after ``exec`` of the program (its tests
included) returned normally, and only in its own process (not in a copy the program forked).
The secret is held only inside C iterators (no name, frame or module refers to it), and an
audit hook whose state lives in default arguments refuses the ways Python code could reach it
anyway (garbage-collector walks, tracing, code-object construction, ctypes). Exit statuses
mean nothing: ``sys.exit(0)``, ``os._exit(0)``, an ``atexit`` hook or a replaced
``sys.excepthook`` before the tests leave no secret, hence a fail. No ``S`` means the sandbox
or the interpreter never started the program: a ``SandboxError``, never a score.

What a marker cannot tell (as with HumanEval's own harness): the tests run in the program's
process, so an answer that subverts them from inside (a returned object whose ``__eq__`` is
always true, a patched builtin the tests call, memory corruption of the interpreter) passes.
The kernel's containment holds regardless.
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
import selectors
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
# from a random place in the range: runs of two processes (two psomerge runs, Dask workers) take
# different user ids, so neither's processes count against the other's process limit
_run_counter = itertools.count(secrets.randbelow(len(RUN_UIDS)))
INIT = Path(__file__).with_name("sandbox_init.py")
PROBE_TIMEOUT = 30.0
# Part of the scorer's config, hence of every cache key over its scores: bump when a change here
# changes what passes (2: copies the program forked never pass; memory is held per run)
SANDBOX_VERSION = 2
PAGE = os.sysconf("SC_PAGE_SIZE")

# Runs first in the sandboxed interpreter (``python -I -S -B -c HARNESS RESULT_FD``).
HARNESS = r'''# psomerge sandbox harness
import collections, itertools, os, sys

def guard(event, args, denied=frozenset(("gc.get_objects", "gc.get_referrers", "gc.get_referents",
                                          "sys._current_frames", "sys.settrace", "sys.setprofile",
                                          "sys.monitoring.register_callback", "code.__new__")),
          denied_modules=("ctypes", "_ctypes", "_test", "_xx", "_interp"), startswith=str.startswith,
          exact=str.__str__, error=PermissionError):
    # default arguments only: nothing the program can rebind (globals, builtins) or write (a
    # closure's cells, through a frame's locals) is read at call time
    if event in denied or startswith(event, "ctypes."):
        raise error("sandbox: " + event + " is not allowed")
    if event == "import" and startswith(exact(args[0]), denied_modules):
        raise error("sandbox: importing " + exact(args[0]) + " is not allowed")

sys.addaudithook(guard)
del guard

def _plan(result_fd):
    job = bytearray()
    chunk = os.read(0, 1 << 16)
    while chunk:
        job += chunk
        chunk = os.read(0, 1 << 16)
    secret, _, source = bytes(job).partition(b"\n")
    os.write(result_fd, b"S")
    code = compile(source, "program.py", "exec")
    # the secret is written by this process only: a copy the program forked runs the same plan,
    # and its tests returning (say, with answers other copies tried and failed) are no pass
    ours = map(os.getpid().__eq__, itertools.starmap(os.getpid, ((),)))
    return itertools.chain(itertools.starmap(exec, ((code, {"__name__": "__main__"}),)),
                           itertools.starmap(os.write, itertools.compress(((result_fd, secret),), ours)),
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
    open_files: int = 256  # bounds what a program can hold in kernel buffers (pipes, sockets)


@dataclass(frozen=True)
class RunOutcome:
    status: str  # passed | failed | timeout | memory (its processes together held more than the limit)
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
        spec = {"mode": self.mode, "bwrap": self.bwrap, "uid": uid, "scorer": os.getpid(),
                "argv": [self.python, "-I", "-S", "-B", "-c", HARNESS, str(result_w)],
                "env": {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"},
                "cpu": limits.cpu_seconds, "address_space": limits.memory_bytes, "file_size": limits.file_bytes,
                "processes": limits.processes, "disk": limits.disk_bytes, "open_files": limits.open_files}
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", str(INIT), json.dumps(spec)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    pass_fds=(result_w,), env={"PATH": "/usr/bin:/bin"}, start_new_session=True)
        finally:
            os.close(result_w)
        try:
            # an answer with a lone surrogate is sent as it is: not UTF-8, hence a program that fails to compile
            job = secret + b"\n" + source.encode(errors="surrogatepass")
            ended, err = _communicate(proc, job, timeout, limits.memory_bytes)
            report = _drain(result_r)
        finally:
            os.close(result_r)
        stderr = err.decode(errors="replace")
        if secret in report:
            return RunOutcome("passed", proc.returncode, stderr)
        if not report.startswith(b"S"):
            what = "did not start the program within the timeout" if ended == "timeout" else \
                "could not start the program"
            detail = f"{what}: {stderr.strip()[-800:] or f'exit status {proc.returncode}'}"
            raise SandboxError(f"code sandbox ({self.describe()}, python {self.python}) {detail}", detail)
        if ended == "memory":
            stderr += f"\nsandbox: the program's processes held more than {limits.memory_bytes >> 20} MB together\n"
        return RunOutcome(ended or "failed", None if ended else proc.returncode, stderr)


STDERR_KEPT = 1 << 16  # the end of a program's stderr that is kept (scores show its last lines)
WATCH_EVERY = 0.05  # seconds between looks at the memory a run's processes hold


def _communicate(proc: subprocess.Popen, job: bytes, timeout: float, memory: int) -> tuple[str | None, bytes]:
    """Send the job and keep the end of stderr (never more than ``STDERR_KEPT`` bytes, however
    much a program writes) until the launcher exits; meanwhile watch the memory its processes
    hold together. Past ``timeout``, or past ``memory`` bytes, kill the launcher (its namespace
    dies with it). Returns why it was killed (``timeout``, ``memory``; None: it exited) and
    the kept stderr."""
    deadline = time.monotonic() + timeout
    kept = bytearray()
    todo = memoryview(job)
    stdin, stderr = proc.stdin.fileno(), proc.stderr.fileno()
    os.set_blocking(stdin, False)
    with selectors.DefaultSelector() as selector:
        selector.register(stdin, selectors.EVENT_WRITE)
        selector.register(stderr, selectors.EVENT_READ)
        ended, look = None, 0.0
        while selector.get_map() or proc.poll() is None:
            now = time.monotonic()
            if (left := deadline - now) <= 0:
                ended = "timeout"
                break
            if now >= look:
                if _resident(proc.pid) > memory:
                    ended = "memory"
                    break
                look = now + WATCH_EVERY
            if not selector.get_map():
                time.sleep(min(left, WATCH_EVERY))
                continue
            for key, _ in selector.select(min(left, WATCH_EVERY)):
                if key.fd == stdin:
                    try:
                        todo = todo[os.write(stdin, todo[: 1 << 16]):]
                    except (BlockingIOError, InterruptedError):
                        continue
                    except BrokenPipeError:  # the launcher failed before reading: its stderr says why
                        todo = todo[:0]
                    if not todo:
                        selector.unregister(stdin)
                        proc.stdin.close()
                elif chunk := os.read(stderr, 1 << 16):
                    kept += chunk
                    del kept[:-STDERR_KEPT]
                else:
                    selector.unregister(stderr)
    if ended is not None:
        for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                kill()
            except (ProcessLookupError, PermissionError):
                pass
        proc.wait()
        kept += _drain(stderr, STDERR_KEPT)  # what was written before the kill
        del kept[:-STDERR_KEPT]
    proc.wait()
    for pipe in (proc.stdin, proc.stderr):
        if not pipe.closed:
            pipe.close()
    return ended, bytes(kept)


def _drain(fd: int, keep: int | None = None, wait: float = 2.0) -> bytes:
    """What is left in a pipe whose writers are gone (its last ``keep`` bytes where given):
    the result pipe (whose capacity bounds it) or stderr after a kill; ``wait`` only bounds
    the kernel's tearing down of the namespace."""
    data = bytearray()
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
        if keep is not None:
            del data[:-keep]
    return bytes(data)


def _resident(root: int) -> int:
    """Bytes of anonymous memory resident in the processes below ``root`` (the launcher,
    not counted): what a program's processes hold together. Files in its /tmp are bounded
    apart, by the size of that tmpfs."""
    total = 0
    todo = _children(root)
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                fields = f.read().split()
            total += (int(fields[1]) - int(fields[2])) * PAGE
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        todo += _children(pid)
    return total


def watches_process_trees() -> bool:
    """Whether this kernel lists each process's children (``/proc/PID/task/TID/children``,
    CONFIG_PROC_CHILDREN), which ``_resident`` walks: without it no run's processes are found,
    and ``memory_bytes`` bounds each process alone."""
    return os.path.exists(f"/proc/self/task/{threading.get_native_id()}/children")


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", "rb") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


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
            if not watches_process_trees():
                log.warning("code sandbox: this kernel does not list child processes (no /proc/PID/task/TID/"
                            "children, CONFIG_PROC_CHILDREN): memory_mb (%d MB) bounds each process of a run, "
                            "not its processes together", limits.memory_bytes >> 20)
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
