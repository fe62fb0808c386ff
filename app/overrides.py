"""Generic pieces of configuration loading that do not depend on the config's schema: dotted-key flattening,
`key=value` overrides parsed as YAML, YAML files holding a mapping, pydantic errors as one line, and the
error every configuration problem raises. `app.config` builds the typed config with them."""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from app.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the offending key."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _suggest(key: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(key, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so 10, 1e-4, true, [1, 2] get their types)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form dotted.key=value")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "config"
        got = e.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{loc}: {msg}{shown}")
    return "invalid config: " + "; ".join(lines)


def read_yaml_mapping(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file holding a mapping (empty file: {}); ConfigError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {p} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {p} must hold a mapping of sections")
    return raw
