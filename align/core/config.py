"""Typed configuration from YAML plus dotted `key=value` overrides.

    cfg = load_config(SFTConfig, "configs/sft/tiny.yaml", ["optim.lr=1e-5"])

Config types are pydantic models with `extra="forbid"`. An unknown key or a value of the wrong type fails with a
`ConfigError` that names the key, the value and where it came from (the file, or the command-line override).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    pass


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found{relative_note(path)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level, got {type(data).__name__}")
    return data


def relative_note(path: str | Path) -> str:
    """For a path that was not found: where a relative one was looked for (paths in configs, the shipped ones
    included, are relative to the working folder, which is the project's root in the README's commands)."""
    if Path(path).is_absolute():
        return ""
    return f" (a relative path: looked for in the working folder, {Path.cwd()})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=1e-5` → (["optim", "lr"], 1e-05). Values are read as YAML scalars (numbers, true/false, lists)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-5" as a string
    return key.strip().split("."), value


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, set[str]]:
    """Set each override in `data` (in place); returns the dotted keys that came from the command line."""
    origin: dict[str, set[str]] = {"override": set()}
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: i + 1])} is a value, not a section")
            node = child
        node[keys[-1]] = value
        origin["override"].add(".".join(keys))
    return origin


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load `cls` from a YAML file (or from defaults when `path` is None), then apply overrides and validate."""
    data = read_yaml(path) if path is not None else {}
    _fix_yaml_floats(data)
    from_cli = apply_overrides(data, overrides)["override"]
    source = str(path) if path is not None else "<defaults>"
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, from_cli)) from None


def _fix_yaml_floats(data: Any) -> None:
    """YAML 1.1 reads `1e-5` (no dot) as a string; read such strings as the numbers everyone means."""
    if isinstance(data, dict):
        for k, v in data.items():
            if isinstance(v, str) and _looks_like_float(v) and not v.strip().isdigit():
                data[k] = float(v)
            else:
                _fix_yaml_floats(v)
    elif isinstance(data, list):
        for v in data:
            _fix_yaml_floats(v)


def format_validation_error(e: ValidationError, source: str, from_cli: set[str]) -> str:
    lines = []
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = "command-line override" if key in from_cli else source
        value = err.get("input")
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{key}' (value {value!r})")
        elif err["type"] == "missing":
            lines.append(f"{where}: missing required key '{key}'")
        else:
            lines.append(f"{where}: key '{key}' has invalid value {value!r}: {err['msg']}")
    return "invalid configuration\n  " + "\n  ".join(lines)


def dump_config(cfg: BaseModel, path: str | Path) -> None:
    """Write the resolved config (every default filled in) next to a run's outputs."""
    from base_model.atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
