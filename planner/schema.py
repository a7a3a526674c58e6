"""Typed dataclasses <-> commented YAML, with errors that name the key and its line.

Generic machinery used by the plan and the fingerprint: ``to_plain`` turns a dataclass into plain
Python types (no numpy scalars), ``dump_yaml`` writes it with a comment above each field (the
field's ``doc`` metadata, plus a per-key reason), and ``from_yaml`` reads it back, checking every
key and type against the dataclass and collecting every error before raising.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
import yaml


class SchemaError(ValueError):
    """All problems of a YAML file, each as 'file:line: key: message'."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def doc(text: str, **kw) -> Any:
    """A dataclass field with a comment that ``dump_yaml`` writes above it."""
    return dataclasses.field(metadata={"doc": text}, **kw)


def to_plain(obj: Any) -> Any:
    """Dataclasses, tuples, numpy scalars and arrays -> dicts, lists, int, float, str, bool, None."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, (int, np.integer)) else int(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


# ---------------------------------------------------------------------------------------- writing

def _scalar(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def _is_flat(v: Any) -> bool:
    return isinstance(v, list) and all(not isinstance(x, (dict, list)) or _is_flat(x) for x in v)


def dump_yaml(obj: Any, reasons: dict[str, str] | None = None, header: str = "") -> str:
    """Commented YAML for a dataclass: the field doc, then '(why: ...)' from ``reasons[dotted.key]``."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    _dump_obj(obj, "", 0, reasons or {}, lines)
    return "\n".join(lines) + "\n"


def _dump_obj(obj: Any, prefix: str, indent: int, reasons: dict, lines: list[str]) -> None:
    pad = " " * indent
    for f in dataclasses.fields(obj):
        key = f"{prefix}{f.name}"
        value = getattr(obj, f.name)
        note = f.metadata.get("doc", "")
        if key in reasons:
            note = f"{note} ({reasons[key]})" if note else reasons[key]
        if dataclasses.is_dataclass(value):
            lines.append("")
        if note:
            lines.extend(f"{pad}# {part}" for part in note.split("\n"))
        _dump_value(f.name, value, key, indent, reasons, lines)


def _dump_value(name: str, value: Any, key: str, indent: int, reasons: dict, lines: list[str]) -> None:
    pad = " " * indent
    if dataclasses.is_dataclass(value):
        lines.append(f"{pad}{name}:")
        _dump_obj(value, key + ".", indent + 2, reasons, lines)
    elif isinstance(value, (list, tuple)) and value and dataclasses.is_dataclass(value[0]):
        lines.append(f"{pad}{name}:")
        for i, item in enumerate(value):
            sub: list[str] = []
            _dump_obj(item, f"{key}.{i}.", indent + 4, reasons, sub)
            first = next(j for j, s in enumerate(sub) if s.strip() and not s.strip().startswith("#"))
            sub[first] = f"{pad}  - {sub[first].strip()}"
            lines.extend(sub)
    elif isinstance(value, dict) and value:
        plain = to_plain(value)
        lines.append(f"{pad}{name}:")
        for k, v in plain.items():
            sub_key = f"{key}.{k}"
            if sub_key in reasons:
                lines.append(f"{pad}  # {reasons[sub_key]}")
            lines.append(f"{pad}  {_scalar(k)}: {_scalar(v) if _is_flat(v) or not isinstance(v, (dict, list)) else yaml.safe_dump(v, default_flow_style=True).strip()}")
    else:
        lines.append(f"{pad}{name}: {_scalar(to_plain(value))}")


# ---------------------------------------------------------------------------------------- reading

def _line_map(node: yaml.Node, prefix: str, out: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = k.start_mark.line + 1
            _line_map(v, key + ".", out)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out[f"{prefix}{i}"] = v.start_mark.line + 1
            _line_map(v, f"{prefix}{i}.", out)


def load_yaml_with_lines(path: Path) -> tuple[Any, dict[str, int]]:
    """Parse YAML safely, returning the data and a map dotted.key -> line number."""
    text = Path(path).read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SchemaError([f"{where}: not valid YAML: {getattr(e, 'problem', e)}"]) from e
    lines: dict[str, int] = {}
    if node is not None:
        _line_map(node, "", lines)
    return data, lines


class Reader:
    """Builds a dataclass from parsed YAML, collecting errors as 'file:line: key: message'."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines, self.errors = source, lines, []

    def error(self, key: str, msg: str) -> None:
        parts = key.split(".")
        line = next((self.lines[".".join(parts[:i])] for i in range(len(parts), 0, -1)
                     if ".".join(parts[:i]) in self.lines), None)
        where = f"{self.source}:{line}" if line else self.source
        self.errors.append(f"{where}: {key}: {msg}")

    def build(self, cls: type, data: Any, key: str = "") -> Any:
        if not isinstance(data, dict):
            self.error(key or "(top)", f"expected a mapping of {cls.__name__} fields, found {type(data).__name__}")
            return None
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs, missing = {}, False
        for k in data:
            if k not in names:
                close = difflib.get_close_matches(str(k), names, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
                self.error(f"{key}{k}", f"unknown key{hint}")
        for f in dataclasses.fields(cls):
            sub = f"{key}{f.name}"
            if f.name in data:
                kwargs[f.name] = self.convert(hints[f.name], data[f.name], sub)
            elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            else:
                self.error(sub, "missing")
                missing = True
        if missing or any(v is _BAD for v in kwargs.values()):
            return _BAD
        return cls(**kwargs)

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out = self.build(tp, value, key + ".")
            return _BAD if out is None else out
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.convert(inner[0], value, key)
        if origin is Literal:
            if value not in args:
                close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
                self.error(key, f"'{value}' is not one of {list(args)}" + (f"; did you mean '{close[0]}'?" if close else ""))
                return _BAD
            return value
        if origin in (list, tuple):
            if not isinstance(value, list):
                self.error(key, f"expected a list, found {_kind(value)}")
                return _BAD
            if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
                self.error(key, f"expected {len(args)} values, found {len(value)}")
                return _BAD
            item_types = args if origin is tuple and args and args[-1] is not Ellipsis else [args[0] if args else Any] * len(value)
            items = [self.convert(t, v, f"{key}.{i}") for i, (t, v) in enumerate(zip(item_types, value))]
            return _BAD if any(i is _BAD for i in items) else (tuple(items) if origin is tuple else items)
        if origin is dict:
            if not isinstance(value, dict):
                self.error(key, f"expected a mapping, found {_kind(value)}")
                return _BAD
            kt, vt = args
            out = {self.convert(kt, k, f"{key}.{k}"): self.convert(vt, v, f"{key}.{k}") for k, v in value.items()}
            return _BAD if any(v is _BAD for v in out.values()) or _BAD in out else out
        if tp is Any:
            return value
        if tp is bool:
            if not isinstance(value, bool):
                self.error(key, f"expected true or false, found {_kind(value)}")
                return _BAD
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, int):
                self.error(key, f"expected a whole number, found {_kind(value)}")
                return _BAD
            return value
        if tp is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.error(key, f"expected a number, found {_kind(value)}")
                return _BAD
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                self.error(key, f"expected text, found {_kind(value)}")
                return _BAD
            return str(value)
        return value


class _Bad:
    def __repr__(self) -> str:
        return "<invalid>"


_BAD = _Bad()


def _kind(v: Any) -> str:
    return "nothing" if v is None else f"{type(v).__name__} {v!r}"[:80]
