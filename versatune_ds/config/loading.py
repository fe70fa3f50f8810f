"""Reading a run config: YAML with line numbers, dotted overrides, path resolution, typed conversion.

`load_config(path, overrides)` reads the YAML file, applies `a.b=c` overrides, converts the result into
`RunConfig` (config.schema) while checking every type, then runs `config.validation.validate` -- and raises
one `ConfigError` that lists every problem (key, value given, what is accepted, and the YAML line where
there is one): unknown keys get a did-you-mean, duplicate YAML keys are refused. Nothing is half-loaded,
in the spirit of torchtune's config validation.

Relative file paths in the YAML file are resolved against the file's own folder, relative paths given
on the command line against the current directory, so a config works from wherever it is launched.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from versatune_ds.config.schema import DEFAULT_DOMAIN_NAMES, HF_SOURCE_PREFIX, ConfigError, DomainConfig, RunConfig
from versatune_ds.config.validation import PATH_KEYS, path_exists, validate
from versatune_ds.errors import UserError


def load_config(
    path: str | os.PathLike[str] | None, overrides: Sequence[str] = (), *, check_files: bool = True
) -> RunConfig:
    """Read a YAML config (or start from defaults when `path` is None), apply overrides, validate.

    `check_files=False` validates everything except that data files exist (for example configs that
    name cluster paths, checked on a machine that does not have them).
    """
    raw: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = None
    base_dir = Path.cwd()
    if path is not None:
        source = str(path)
        file_path = Path(path)
        try:
            text = file_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except UnicodeDecodeError as exc:
            raise UserError(f"config file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        try:
            node = yaml.compose(text)
            loaded = yaml.safe_load(text)
        except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date-like scalar such as 2020-13-45
            raise UserError(f"config file {path} is not valid YAML{_yaml_reason(exc, str(path))}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of sections (model:, data:, ...), got {type(loaded).__name__}")
        raw = loaded
        if node is not None:
            _collect_lines(node, "", lines)
            # PyYAML keeps the last of two equal keys without a word; a silently ignored setting is a trap.
            twice = _duplicate_keys(node, "")
            if twice:
                raise ConfigError([f"{key}: given twice (lines {a} and {b}); keep one" for key, a, b in twice], source)
        base_dir = file_path.resolve().parent
    raw = _resolve_paths(raw, base_dir)
    for item in overrides:
        _apply_override(raw, item)
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems, lines, source)
    if problems:
        raise ConfigError(problems, source)
    cfg = _expand_named_domains(cfg)
    problems = validate(cfg, check_files=check_files)
    if problems:
        raise ConfigError([_with_line(p, lines, source) for p in problems], source)
    return cfg


def _yaml_reason(exc: Exception, source: str | None) -> str:
    """`: <file>:<line>:<column>: <what>` from a YAML error, without PyYAML's multi-line source excerpt."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem_mark is not None:
        mark = exc.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}: " if source else f"column {mark.column + 1}: "
        what = "; ".join(part for part in (exc.context, exc.problem) if part)
        return f": {where}{what}"
    return f": {exc}"


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int], active: frozenset[int] = frozenset()) -> None:
    """Map dotted key paths to 1-based YAML line numbers, so errors can point at `file:line`."""
    # An alias may point at one of its own ancestors (`a: &x [*x]`); stop there instead of recursing forever.
    if id(node) in active:
        return
    active = active | {id(node)}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            lines[key] = key_node.start_mark.line + 1
            _collect_lines(value_node, key, lines, active)
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            key = f"{prefix}[{index}]"
            lines[key] = child.start_mark.line + 1
            _collect_lines(child, key, lines, active)


def _duplicate_keys(node: yaml.Node, prefix: str, active: frozenset[int] = frozenset()) -> list[tuple[str, int, int]]:
    """(dotted key, first line, second line) for every key written twice in the same YAML mapping."""
    if id(node) in active:  # a recursive alias
        return []
    active = active | {id(node)}
    found: list[tuple[str, int, int]] = []
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode) and key in first_line:
                found.append((key, first_line[key], line))
            first_line.setdefault(key, line)
            found.extend(_duplicate_keys(value_node, key, active))
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            found.extend(_duplicate_keys(child, f"{prefix}[{index}]", active))
    return found


def _with_line(problem: str, lines: Mapping[str, int], source: str | None) -> str:
    if source is None:
        return problem
    key = problem.split(":", 1)[0]
    # A value filled in from a default (e.g. `train` from data.dir) has no line: point at the nearest parent key.
    while key and key not in lines:
        cut = max(key.rfind("."), key.rfind("["))
        key = key[:cut] if cut > 0 else ""
    if not key:
        return problem
    return f"{problem} ({source}:{lines[key]})"


def _resolve_paths(raw: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Make the YAML's relative data paths absolute against the config file's folder."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return raw
    data = dict(data)
    if isinstance(data.get("dir"), str):
        data["dir"] = _resolve_one(data["dir"], base_dir)
    domains = data.get("domains")
    if isinstance(domains, list):
        resolved = []
        for entry in domains:
            if isinstance(entry, dict):
                entry = dict(entry)
                for key in PATH_KEYS:
                    value = entry.get(key)
                    if isinstance(value, str):
                        entry[key] = _resolve_one(value, base_dir)
                    elif isinstance(value, list):
                        entry[key] = [_resolve_one(v, base_dir) if isinstance(v, str) else v for v in value]
            resolved.append(entry)
        data["domains"] = resolved
    out = dict(raw)
    out["data"] = data
    # These may name a hub model (`model.path`) or a file made later (the tiny model of the quickstart), and
    # a resolved config.yaml is loaded again from the run directory: resolve them against the config's
    # folder when the path exists there or is written explicitly relative (`./x`, `../x`; hub names never
    # are), and otherwise leave them as written (relative to the current directory).
    for section, key in _OPTIONALPATH_KEYS:
        block = out.get(section)
        if isinstance(block, dict) and isinstance(block.get(key), str) and block[key]:
            value = os.path.expanduser(block[key])
            candidate = base_dir / value
            explicit = value.startswith(("./", "../", ".\\", "..\\"))
            if not Path(value).is_absolute() and (explicit or path_exists(candidate)):
                out[section] = {**block, key: _resolve_one(value, base_dir)}
    return out


_OPTIONALPATH_KEYS = (
    ("model", "path"),
    ("model", "tokenizer"),
    ("data", "template"),  # a .jinja file (template names such as llama3 are left as they are)
    ("deepspeed", "config"),
    ("mixture", "distribution"),
    ("classifier", "path"),
)


def _resolve_one(value: str, base_dir: Path) -> str:
    if value.startswith(HF_SOURCE_PREFIX):
        return value
    expanded = Path(os.path.expanduser(value))
    try:
        return str(expanded if expanded.is_absolute() else (base_dir / expanded).resolve())
    except (ValueError, OSError):  # e.g. an embedded NUL byte: leave it; validation reports the file as not found
        return value


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b.c=value` override; the value is parsed as a YAML scalar or list."""
    if "=" not in item:
        raise UserError(f"override {item!r} has no '=': write overrides as key=value, e.g. train.max_steps=200")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a date-like value such as 2020-13-45
        raise UserError(f"override {item!r}: the value is not valid YAML{_yaml_reason(exc, None)}; quote it if it is text") from None
    parts = key.split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        node = _override_child(node, part, ".".join(parts[: depth + 1]), item)
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, key, item)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise UserError(f"override {item!r}: {'.'.join(parts[:-1])} is a value, not a section")


def _override_child(node: Any, part: str, path: str, item: str) -> Any:
    if isinstance(node, dict):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        return child
    if isinstance(node, list):
        index = _list_index(node, part, path, item)
        if isinstance(node[index], str):  # a domain given by name only (`- law`), addressed by position
            node[index] = {"name": node[index]}
        return node[index]
    parent = path.rsplit(".", 1)[0]
    raise UserError(f"override {item!r}: {parent} is a value, not a section")


def _list_index(node: list[Any], part: str, path: str, item: str) -> int:
    """A list element is addressed by position (`data.domains.0`) or, for domains, by name (`data.domains.law`)."""
    if part.isascii() and part.isdigit() and int(part) < len(node):  # "²".isdigit() is True but int() fails
        return int(part)
    for index, entry in enumerate(node):
        if (isinstance(entry, dict) and entry.get("name") == part) or entry == part:
            if isinstance(entry, str):
                node[index] = {"name": entry}
            return index
    raise UserError(f"override {item!r}: {path} matches no list element (use a position 0..{len(node) - 1} or a domain name)")


def _build(cls: type, raw: Any, prefix: str, problems: list[str], lines: Mapping[str, int], source: str | None) -> Any:
    """Turn a mapping into dataclass `cls`, recording every unknown key and wrongly typed value."""
    if not isinstance(raw, dict):
        problems.append(_with_line(f"{prefix or 'config'}: expected a mapping of keys, got {raw!r}", lines, source))
        return None if any(_is_required(f) for f in dataclasses.fields(cls)) else cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            problems.append(_with_line(f"{path}: unknown key{hint}", lines, source))
            continue
        kwargs[key] = _convert(hints[key], value, path, problems, lines, source)
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs and _is_required(f)]
    if missing:  # only DomainConfig.name has no default
        problems.append(_with_line(f"{prefix}.{missing[0]}: missing; every domain needs a name (name: law)", lines, source))
        return None
    return cls(**kwargs)


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _convert(hint: Any, value: Any, path: str, problems: list[str], lines: Mapping[str, int], source: str | None) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, problems, lines, source)
    if dataclasses.is_dataclass(hint):
        if hint is DomainConfig and isinstance(value, str):
            value = {"name": value}
        return _build(hint, value, path, problems, lines, source)
    if origin is tuple:
        if isinstance(value, (str, dict)) and args[0] is str:
            value = [value]
        if not isinstance(value, list):
            problems.append(_with_line(f"{path}: expected a list, got {value!r}", lines, source))
            return ()
        return tuple(_convert(args[0], v, f"{path}[{i}]", problems, lines, source) for i, v in enumerate(value))
    if origin in (collections.abc.Mapping, dict) or hint is Mapping:
        if not isinstance(value, dict):
            problems.append(_with_line(f"{path}: expected a mapping of domain name to number, got {value!r}", lines, source))
            return None
        out: dict[str, float] = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                problems.append(_with_line(f"{path}.{k}: expected a finite number, got {v!r}", lines, source))
                continue
            out[str(k)] = float(v)
        return types.MappingProxyType(out)
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(_with_line(f"{path}: expected true or false, got {value!r}", lines, source))
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(_with_line(f"{path}: expected an integer, got {value!r}", lines, source))
        return value
    if hint is float:
        # PyYAML reads `3e-4` (no dot) as a string (YAML 1.1); accept any string Python reads as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            problems.append(_with_line(f"{path}: expected a finite number, got {value!r}", lines, source))
            return value
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            problems.append(_with_line(f"{path}: expected a string, got {value!r}", lines, source))
        return value
    raise AssertionError(f"unsupported config type {hint!r} at {path}")  # a bug in the dataclasses above


def _expand_named_domains(cfg: RunConfig) -> RunConfig:
    """Fill in defaults: the six default domains, and `<data.dir>/<name>.jsonl` for domains given by name only."""
    domains = cfg.data.domains or tuple(DomainConfig(name=n) for n in DEFAULT_DOMAIN_NAMES)
    if cfg.data.dir is not None:
        domains = tuple(
            d if d.train else dataclasses.replace(d, train=(str(Path(cfg.data.dir) / f"{d.name}.jsonl"),))
            for d in domains
        )
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, domains=domains))


