"""Code execution scorer (HumanEval / MBPP style): run program + tests, pass = the tests
returned.

Each program runs in a fresh sandbox (``psomerge.judges.sandbox``): the kernel contains it
(namespaces, a read-only host, a private size-limited ``/tmp``, rlimits, no root), and it
passes only when the harness saw ``exec`` of the whole program (tests included) return, as
HumanEval's harness records a pass only after ``check(...)`` returned: exiting early with
status 0 is a fail. The sandbox is probed once, when the scorer is made: one that cannot work
here is an error (or, with bubblewrap broken and root available, a loud fallback), never a
run of zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from psomerge.judges.protocol import Example, Score, ScorerBase
from psomerge.judges.sandbox import SANDBOX_VERSION, Limits, RunOutcome, Sandbox, SandboxError, sandbox_for
from psomerge.templates import field_validator_for, fill
from psomerge.yamlconfig import StrictModel, validate

__all__ = ["CodeExec", "CodeExecSettings", "RunOutcome", "SandboxError"]

HUMANEVAL_TEMPLATE = "{prompt}{answer}\n\n{test}\n\ncheck({entry_point})\n"
MBPP_TEMPLATE = "{answer}\n\n{test_setup_code}\n{tests}\n"


class CodeExecSettings(StrictModel):
    type: Literal["code_exec"] = "code_exec"
    program_template: str = HUMANEVAL_TEMPLATE
    timeout: float = Field(5.0, gt=0)
    memory_mb: int = Field(512, gt=0)  # each process's address space, and what the run's processes hold together
    max_file_mb: int = Field(16, gt=0)
    disk_mb: int = Field(64, gt=0)  # the program's whole writable storage: its private /tmp
    max_processes: int = Field(64, gt=0)
    workers: int = Field(2, gt=0)
    use_bwrap: bool = True  # bubblewrap when installed and usable, else namespaces by hand (root)

    check_templates = field_validator_for("program_template")


class CodeExec(ScorerBase):
    """pass@1 of (program template filled with the example's fields and the answer)."""

    name = "code_exec"

    def __init__(self, settings: CodeExecSettings | None = None, **fields: Any):
        self.settings = settings or validate(CodeExecSettings, fields, "code_exec")
        s = self.settings
        self.limits = Limits(cpu_seconds=int(s.timeout) + 1, memory_bytes=s.memory_mb * 1024**2,
                             file_bytes=s.max_file_mb * 1024**2, processes=s.max_processes,
                             disk_bytes=s.disk_mb * 1024**2)
        self.sandbox: Sandbox = sandbox_for(s.use_bwrap, self.limits)  # probed once: fails here, not per answer

    def config(self) -> dict[str, Any]:
        s = self.settings
        config = {"type": self.name, "program_template": s.program_template, "timeout": s.timeout,
                  "memory_mb": s.memory_mb, "disk_mb": s.disk_mb, "pass": "tests returned", "sandbox": SANDBOX_VERSION}
        # the file-size and process limits decide passes too (a program writing past one fails); only where
        # they are not the default, so the keys of scores cached with the defaults stay as they were
        for key in ("max_file_mb", "max_processes"):
            if getattr(s, key) != CodeExecSettings.model_fields[key].default:
                config[key] = getattr(s, key)
        return config

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

    def run(self, program: str) -> RunOutcome:
        """One program in a fresh sandbox; raises ``SandboxError`` when it could not start."""
        return self.sandbox.run(program, self.limits, self.settings.timeout)
