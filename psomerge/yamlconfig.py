"""Reading YAML files into validated pydantic models, with errors naming file and key."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from psomerge.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


class StrictModel(BaseModel):
    """A config section: an unknown key is an error, never silently ignored."""

    model_config = ConfigDict(extra="forbid")


def read_yaml(path: str | Path, what: str) -> Any:
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot read {what}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc


def validation_message(exc: ValidationError, data: Any, source: str) -> str:
    """The first validation error as "<source>: key '<dotted key>': <message>"."""
    err = exc.errors()[0]
    parts = _user_key(err["loc"], data)
    message = err["msg"]
    if err["type"] == "union_tag_invalid":  # see tagged_union: the chooser is named after its key
        ctx = err["ctx"]
        parts.append(str(ctx["discriminator"]).removesuffix("()"))
        message = f"{ctx['tag']!r} is not one of {ctx['expected_tags']}"
    message = message.removeprefix("Value error, ")
    if not parts:  # a check across keys
        return f"{source}: {message}"
    return f"{source}: key {'.'.join(parts)!r}: {message}"


def _user_key(loc: tuple, data: Any) -> list[str]:
    """The error location as the user wrote it. Pydantic puts the chosen member of a tagged
    union into the location ('optimizer.pso.decay'); that name is no key of the input."""
    parts: list[str] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and isinstance(part, str) and part not in node and not last:
            continue  # a union member's name
        parts.append(str(part))
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        else:
            node = None
    return parts


def validate(model: type[M], data: dict[str, Any], source: str) -> M:
    """Validate ``data`` as ``model``, turning the first error into a ConfigError naming the
    file and key. A model with a ``source`` field is told where it came from."""
    if "source" in model.model_fields:
        data = {**data, "source": source}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, data, source)) from None


def tagged_union(members: dict[str, type[BaseModel]], key: str = "type", default: str | None = None,
                 fallback: str | None = None) -> Any:
    """A config section that is one of ``members``, chosen by its ``key`` (e.g. ``type:``),
    ``default`` when the key is absent, ``fallback`` (if given) for a value no member names.
    Options of another member are errors, not ignored."""
    from typing import Annotated, Union

    from pydantic import Discriminator, Tag

    def choose(value: Any) -> str | None:
        tag = value.get(key, default) if isinstance(value, dict) else getattr(value, key, None)
        if fallback is not None and (tag not in members or tag == fallback):
            return fallback
        return tag

    choose.__name__ = choose.__qualname__ = key  # error messages name the key
    union = Union[tuple(Annotated[model, Tag(tag)] for tag, model in members.items())]  # noqa: UP007
    return Annotated[union, Discriminator(choose)]
