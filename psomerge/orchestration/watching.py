"""Who watches this process's flow runs. A flow parameter must be JSON (a progress display is
not), and Dask and Ray pickle the flow function with the globals it names, which a context
variable cannot be: so the flow reads it through these functions, pickled by reference."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

from psomerge.progress import SILENT, Progress

_PROGRESS: contextvars.ContextVar[Progress] = contextvars.ContextVar("psomerge_progress", default=SILENT)


def current_progress() -> Progress:
    return _PROGRESS.get()


@contextmanager
def watched_by(progress: Progress) -> Iterator[None]:
    token = _PROGRESS.set(progress)
    try:
        yield
    finally:
        _PROGRESS.reset(token)
