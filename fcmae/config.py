"""Typed run configs: a dataclass schema, YAML files and dotted `key=value` overrides.

A command defines its schema as nested dataclasses (sections) and calls `load_config(Schema, path, overrides)`:
unknown keys, wrong types and values outside a `Literal[...]` fail with a ValueError naming the dotted key and the
valid choices; then the schema's own `check()` (if any) rejects impossible combinations. All of this happens before
any data or GPU work. `save_config` writes the resolved config (every key, defaults included) as YAML.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _yaml_error(e: yaml.YAMLError, where: str) -> ValueError:
    """A YAML syntax error as one line: what, where (line/column), and the fix."""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return ValueError(f"{where} is not valid YAML ({problem}{at}); fix the syntax (quote values holding [ ] {{ }} : #)")


class NotFiniteError(ValueError):
    """A float key given NaN or an infinity (a type error, whichever other types the key allows)."""


def _coerce(value: Any, tp: Any, key: str, raw: dict[str, str] | None = None) -> Any:
    """Check `value` against the annotation `tp` (int, float, bool, str, Literal, Optional, list/tuple, dataclass).

    raw: dotted key -> the text of a command-line override; a str key takes that text as is (`output_dir=2024` is
    the folder "2024", not YAML's int).
    """
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r} is a section; give a mapping of its keys, not {value!r}")
        return from_dict(tp, value, prefix=f"{key}.", raw=raw)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ValueError(f"config key {key!r} = {value!r} is not valid; choose one of: "
                             f"{', '.join(map(str, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, raw)
            except NotFiniteError:
                raise
            except ValueError:
                pass
        raise ValueError(f"config key {key!r} = {value!r} has the wrong type; expected {_type_name(tp)}"
                         + (_quote_hint(key, value) if str in args else ""))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {key!r} = {value!r} must be a list ({_type_name(tp)})")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ValueError(f"config key {key!r} = {value!r} must have {len(args)} items")
            return [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        item = args[0] if args else Any
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    return _coerce_scalar(value, tp, key, raw)


def _coerce_scalar(value: Any, tp: Any, key: str, raw: dict[str, str] | None) -> Any:
    """`_coerce` for Any, bool, int (64-bit), float (finite; YAML's `1e-4` string too) and str."""
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not -2**63 <= value < 2**63:  # every int key ends up in torch / numpy, which hold 64 bits
                raise ValueError(f"config key {key!r} = {value} does not fit in 64 bits; give a smaller number")
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf / .nan / 1e999: no key means anything by them
                raise NotFiniteError(f"config key {key!r} = {value!r} is not a finite number; give a finite value")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if raw is not None and key in raw and isinstance(value, (int, float, bool)):
            return raw[key]
    raise ValueError(f"config key {key!r} = {value!r} has the wrong type; expected {_type_name(tp)}"
                     + (_quote_hint(key, value) if tp is str else ""))


def _quote_hint(key: str, value: Any) -> str:
    """YAML reads 2024, 1e3, on/off/yes/no/true/false unquoted as numbers and booleans: say how to keep the text."""
    if not isinstance(value, (int, float, bool)):
        return ""
    leaf = key.rsplit(".", 1)[-1]
    return (f" (YAML read the unquoted value as {type(value).__name__}); to mean the text, quote it in the YAML "
            f"file, e.g. {leaf}: \"...\"")


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "", raw: dict[str, str] | None = None) -> T:
    """Build dataclass `cls` from a nested dict; missing keys keep their defaults. raw: see `_coerce`."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted((str(k) for k in data if k not in fields))  # YAML keys may be numbers, booleans, null
    if unknown:
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r}; valid keys{' in ' + prefix[:-1] if prefix else ''}: "
            f"{', '.join(sorted(fields))}"
        )
    hints = get_type_hints(cls)
    kwargs = {name: _coerce(value, hints[name], prefix + name, raw) for name, value in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config's keys as plain dicts/lists/scalars (tuples become lists, so YAML and `weights_only` loading both
    work); a field with init=False is derived state a check() sets, not a key, and is left out."""
    def plain(x: Any) -> Any:
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: plain(getattr(x, f.name)) for f in dataclasses.fields(x) if f.init}
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x
    return plain(cfg)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["optim.epochs=10", "data.path=/x"] -> {"optim": {"epochs": 10}, "data": {"path": "/x"}}; values are YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.epochs=10)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise _yaml_error(e, f"override {item!r}") from None
        node = out
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[leaf] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; `over` wins."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class NotSetError(ValueError):
    """A key the user must still give (a recipe leaves `data.path` open). Schemas raise it after every other check,
    so `--print-config` can show such a config, while any other problem refuses it."""


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of a YAML config file; ValueError (one line: the file, the problem, the fix) for anything else."""
    where = f"config file {str(path)!r}"
    if not os.path.isfile(path):
        raise ValueError(f"{where} does not exist; pass an existing YAML file to --config")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{where} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); save it "
                         "as UTF-8, the encoding YAML files use") from None
    except yaml.YAMLError as e:
        raise _yaml_error(e, where) from None
    except OSError as e:
        raise ValueError(f"cannot read {where} ({e.strerror}); check its permissions") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a mapping of keys (key: value lines), got {type(data).__name__} "
                         f"{data!r:.80}")
    return data


def user_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """What the user gave: the YAML file (if any) with the `key=value` overrides merged over it, as nested dicts."""
    data = read_config_file(path) if path is not None else {}
    return merge(data, parse_overrides(overrides or []))


def override_text(overrides: list[str] | None) -> dict[str, str]:
    """Dotted key -> the text of its command-line override (a str key takes it as written: see `_coerce`)."""
    return {key.strip(): text.strip() for key, sep, text in (o.partition("=") for o in overrides or []) if sep}


def config_from(cls: type[T], data: dict[str, Any], overrides: list[str] | None = None) -> T:
    """`cls` from nested dicts (`overrides`: the command-line items they include), type-checked, then
    `cfg.check()` if the schema defines it."""
    cfg = from_dict(cls, data, raw=override_text(overrides))
    check = getattr(cfg, "check", None)
    if callable(check):
        check()
    return cfg


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> T:
    """Schema defaults <- YAML file <- overrides, type-checked, then `cfg.check()` if the schema defines it."""
    return config_from(cls, user_config(path, overrides), overrides)


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (a failed write: a WriteError naming `path`, no temp left)."""
    from convnextv2.checkpoint.io import atomic_write

    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))



def add_config_arguments(parser: argparse.ArgumentParser, config_help: str, override_example: str,
                         print_config: bool = False) -> None:
    """`--config FILE` and positional `key=value` overrides, the interface every config-driven command shares
    (and `--print-config`, for the commands that offer it)."""
    parser.add_argument("--config", default=None, help=config_help)
    if print_config:
        parser.add_argument("--print-config", action="store_true",
                            help="print every key: its value, default and source (recipe/override), then exit")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {override_example}")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim": {"epochs": 1}} -> {"optim.epochs": 1} (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_keys(cls: type) -> set[str]:
    """Every dotted key of a schema and every section holding keys: {"seed", "optim", "optim.lr", ...}."""
    hints = get_type_hints(cls)
    keys: set[str] = set()
    for f in (f for f in dataclasses.fields(cls) if f.init):  # init=False fields are derived, not keys
        keys.add(f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= {f"{f.name}.{k}" for k in config_keys(hints[f.name])}
    return keys


def show_value(value: Any) -> str:
    """A value as it would be written in YAML, on one line."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("\n...").strip()


def describe_config(cls: type, path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> str:
    """The resolved config as a table (`--print-config`): every key, its value, the schema's default, and where the
    value comes from (default | recipe | override). Everything the run refuses is refused here, with the same
    message, except a key still to be given (`NotSetError`, e.g. data.path in a recipe): printed as a last line."""
    given = read_config_file(path) if path is not None else {}
    over = parse_overrides(overrides or [])
    problem = ""
    cfg = from_dict(cls, merge(given, over), raw=override_text(overrides))
    try:
        check = getattr(cfg, "check", None)
        if callable(check):
            check()
    except NotSetError as e:  # what check() resolved before it (model.patch_size=auto) stays resolved
        problem = f"# not runnable as is: {e}"
    given, over = flatten(given), flatten(over)
    values, defaults = flatten(to_dict(cfg)), flatten(to_dict(cls()))
    width = max(len(k) for k in values) + 2
    rows = [(k, show_value(v) + (" (auto)" if over.get(k, given.get(k, defaults.get(k))) == "auto" != v else ""),
             show_value(defaults.get(k)), "override" if k in over else "recipe" if k in given else "default")
            for k, v in values.items()]
    vw = max(len(r[1]) for r in rows) + 2
    lines = [f"# {cls.__name__} from {path or 'the defaults'}" + (f" + {len(over)} override(s)" if over else ""),
             f"{'key':<{width}}{'value':<{vw}}{'default':<{vw}}from"]
    lines += [f"{k:<{width}}{v:<{vw}}{d:<{vw}}{src}" for k, v, d, src in rows]
    return "\n".join(lines + ([problem] if problem else []))
