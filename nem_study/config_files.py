"""Run configs from files: a YAML mapping, ``--set key=value`` overrides, and one message
naming every problem of a config that does not validate (the schema is ``nem_study.config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from nem_study import inputs
from nem_study.config import DataConfig, InputError, RunConfig

def format_validation_error(err: ValidationError, source: str = "config") -> str:
    lines = [f"{source}: {len(err.errors())} problem(s)"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {path}: {msg}" + (f" (got {e['input']!r})" if e["type"] != "extra_forbidden"
                                           and not isinstance(e.get("input"), dict) else ""))
    return "\n".join(lines)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a file, read through :func:`nem_study.inputs.read_yaml` (size, encoding,
    depth and alias limits: any problem is one InputError naming the file)."""
    raw = inputs.read_yaml(path)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set {item!r}: expected KEY=VALUE, e.g. model.k=5")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {item!r}: {part} is not a section")
        node[parts[-1]] = inputs.parse_yaml(value, f"--set {item!r}") if value.strip() else None
    return raw


def load_run_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    raw = read_yaml(path) if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise InputError(format_validation_error(e, str(path or "config"))) from None


def load_data_config(name_or_path: str, overrides: list[str] | None = None) -> DataConfig:
    """A data set by name (``flying_shapes``) or by a YAML spec file."""
    if name_or_path.endswith((".yaml", ".yml")):
        raw = read_yaml(name_or_path)
        raw = raw.get("data", raw)  # a run config works too
    else:
        raw = {"name": name_or_path}
    raw = apply_overrides(raw, overrides or [])
    try:
        return DataConfig.model_validate(raw)
    except ValidationError as e:
        raise InputError(format_validation_error(e, name_or_path)) from None
