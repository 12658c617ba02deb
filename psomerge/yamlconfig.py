"""Reading YAML files into validated pydantic models, with errors naming file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from psomerge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """``model(**data)``, turning the first validation error into one naming the key."""
    try:
        return model(**data, source=source)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{source}: key {key!r}: {err['msg']}") from None
