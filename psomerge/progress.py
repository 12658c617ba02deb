"""Progress of long work (particles within a step, examples within an evaluation, tensors
within a merge or a basis build, steps of fine-tuning), reported to whoever watches: the
library calls ``progress.start(what, total)`` and ``advance``; the command line shows a bar
on a terminal and periodic log lines elsewhere. By default nothing is shown."""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    def advance(self, n: int = 1) -> None: ...

    def close(self) -> None: ...


class Progress(Protocol):
    def start(self, what: str, total: int | None) -> ProgressTask: ...


class _Quiet:
    def advance(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


class Silent:
    """Shows nothing."""

    def start(self, what: str, total: int | None) -> ProgressTask:
        return _Quiet()


SILENT = Silent()
