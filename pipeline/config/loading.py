"""Loading a config: a YAML file plus dotted overrides, merged, validated, and explained when wrong.

Parsing ``train.lr=3e-4`` overrides as YAML, merging them into the file, turning pydantic's errors into one
``ConfigError`` that names each bad key (and whether the file or the command line set it) with the valid keys
beside it, the ``--dump``/``--write`` command line (``python -m pipeline.config``), and masking a database
password wherever a config is shown.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.artifacts import atomic_path
from pipeline.config.sections import Config
from pipeline.errors import ConfigError


class YamlLoader(yaml.SafeLoader):
    """YAML as in version 1.2: only true/false are booleans, so `runtime.amp: off` is the string 'off' (PyYAML
    follows YAML 1.1, where on/off/yes/no are booleans too, and `off` would fail as "got False")."""


YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-3", "backbones=[a,b]"]`` -> a nested dict, values parsed as YAML."""
    nested: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        try:
            value = yaml.load(raw, Loader=YamlLoader) if raw != "" else None
        except yaml.YAMLError:
            value = raw
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "space":
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _valid_keys(model: type[BaseModel], location: tuple) -> list[str]:
    for part in location[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None) if field else None
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return []
    return list(model.model_fields)


def _set_by_override(location: tuple, overridden: dict) -> bool:
    """Whether a dotted override set the key at ``location``."""
    node = overridden
    for part in location:
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return bool(location)


def _explain(error: ValidationError, source: str, model: type[BaseModel], overridden: dict | None = None
             ) -> ConfigError:
    """One ConfigError naming every bad key, each one a command-line override set marked as such (else ``source``
    set it)."""
    lines = []
    for item in error.errors():
        location = tuple(p for p in item["loc"] if not str(p).startswith(("function-", "literal[")))
        key = ".".join(str(p) for p in location) or "(top level)"
        where = "command-line override " if _set_by_override(location, overridden or {}) else ""
        if item["type"] == "extra_forbidden":
            valid = _valid_keys(model, location)
            close = difflib.get_close_matches(str(location[-1]), valid, n=1)
            hint = f"; did you mean '{'.'.join([*map(str, location[:-1]), close[0]])}'?" if close else ""
            lines.append(f"{where}unknown key '{key}'{hint} (valid keys here: {', '.join(valid)})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{where}'{key}': {message} (got {item.get('input')!r})")
    return ConfigError(f"invalid config {source}:\n  " + "\n  ".join(lines))


def load_model(model: type[BaseModel], path: str | Path | None, overrides: list[str] | tuple = ()) -> Any:
    """Read a YAML file (None: the defaults), apply dotted overrides, validate as ``model``."""
    raw: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            raw = yaml.load(Path(path).read_text(), Loader=YamlLoader) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    overridden = parse_overrides(list(overrides))
    raw = deep_merge(raw, overridden)
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        raise _explain(error, source, model, overridden) from None


def mask_password(url: str) -> str:
    """``scheme://user:password@host/db`` -> ``scheme://user:***@host/db``; anything else unchanged."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def dump(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json", exclude_none=False), sort_keys=False)


def run_cli(load: Callable[..., BaseModel], argv: list[str] | None = None) -> None:
    """``python -m pipeline.config``: validate a config and print it resolved (``--dump``: the defaults).

    ``--write FILE`` writes the resolved config there instead (atomically): with ``--write params.yaml`` a preset
    or a competition's settings become what ``dvc repro`` and ``dvc exp run`` track, backbones included.
    """
    parser = argparse.ArgumentParser(description="Validate a config and print it resolved.")
    parser.add_argument("--config", default="params.yaml")
    parser.add_argument("--dump", action="store_true", help="print the defaults (for params.yaml)")
    parser.add_argument("--write", metavar="FILE", help="write the resolved config to FILE (e.g. params.yaml)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        config = load(None if args.dump else args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.write is None:
        print(mask_password(dump(config)), end="")  # shown, so a database password is masked
        return
    with atomic_path(args.write) as temporary:
        Path(temporary).write_text(dump(config))
    print(f"wrote {args.write}: {'the defaults' if args.dump else args.config} "
          f"{' '.join(args.overrides)}".rstrip(), file=sys.stderr)


def load_config(path: str | Path | None = "params.yaml", overrides: list[str] | tuple = ()) -> Config:
    """Read a YAML config (None: the defaults), apply dotted overrides, validate."""
    return load_model(Config, path, overrides)


def main(argv: list[str] | None = None) -> None:
    """Validate a config and print it resolved; ``--dump`` prints the defaults (params.yaml)."""
    run_cli(load_config, argv)


