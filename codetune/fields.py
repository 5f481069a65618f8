"""Declaring a setting once: its default, help, allowed values and range, and which commands read it.

config.py declares every section's fields with opt(). A value reaches a field from a YAML file, a flag
or Python code; convert() and check_value() are the one place each of them is read and checked, so a
value refused as a flag is refused in YAML too.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad setting: the message names the key and how to fix it."""


@dataclass(frozen=True)
class Spec:
    """What opt() records beside a field's default."""
    help: str
    used_by: tuple[str, ...]     # commands that read the field: they alone get its flag and its YAML value
    choices: tuple | None = None  # allowed values (of each element, for a list)
    ge: float | None = None      # value >= ge
    gt: float | None = None      # value > gt
    le: float | None = None      # value <= le
    lt: float | None = None      # value < lt
    finite: bool = True          # a float field refuses inf and nan
    hint: str = ""               # appended to a range error: what is usual
    positional: bool = False     # the command also takes it as positional arguments (added to the flag's)


def opt(default, help: str, *, used_by: tuple[str, ...], choices: tuple | None = None, ge=None, gt=None,
        le=None, lt=None, finite: bool = True, hint: str = "", positional: bool = False):
    """A dataclass field with its declaration (see Spec) kept next to its default."""
    meta = {"spec": Spec(help, tuple(used_by), choices, ge, gt, le, lt, finite, hint, positional)}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


def spec_of(f: dataclasses.Field) -> Spec:
    return f.metadata["spec"]


def default_of(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def parse_size(text: str | None) -> int | None:
    """'10GiB', '6GB', '512MiB', '1.5G' -> bytes. None stays None."""
    if text is None or text == "":
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*", str(text), flags=re.I)
    if not m:
        raise ConfigError(f"cannot read size {text!r}: write it like 10GiB, 6GB or 512MiB")
    num, unit, ib = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if (ib.lower().startswith("i") or not ib) else 1000
    return int(num * base ** " KMGT".index(unit or " "))


# ----------------------------------------------------------------------------------------------
# Reading a value


def strip_optional(tp):
    """(type, whether None is allowed) of a field annotation like `int | None`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _number(where: str, value, kind: str) -> float | int:
    """A number as people write it. PyYAML reads 3e-3 and 1e2 as text (YAML 1.1 wants a dot), and flags
    are always text, so text is parsed here; a bool is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected {kind}, got {type(value).__name__} {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None
    return value


def convert(where: str, tp, value):
    """`value` (from YAML, a flag or Python) as the field's type, or a ConfigError naming `where`."""
    base, optional = strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: may not be empty")
    if typing.get_origin(base) is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [str(v) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if base is int:
        n = _number(where, value, "an integer")
        if isinstance(n, float):
            if not (math.isfinite(n) and n.is_integer()):
                raise ConfigError(f"{where}: expected an integer, got {value!r}")
            n = int(n)  # 1e2 -> 100
        return n
    if base is float:
        return float(_number(where, value, "a number"))
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected text, got {type(value).__name__} {value!r}")
        return str(value)
    return value


def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(spec: Spec) -> str:
    parts = []
    if spec.ge is not None:
        parts.append(f"at least {_fmt(spec.ge)}")
    if spec.gt is not None:
        parts.append(f"greater than {_fmt(spec.gt)}")
    if spec.le is not None:
        parts.append(f"at most {_fmt(spec.le)}")
    if spec.lt is not None:
        parts.append(f"less than {_fmt(spec.lt)}")
    return " and ".join(parts)


def check_value(name: str, spec: Spec, value) -> None:
    """The field's declared choices and range, for a value already of the field's type."""
    if value is None:
        return
    hint = f" ({spec.hint})" if spec.hint else ""
    if spec.choices is not None:
        if isinstance(value, list):
            bad = [v for v in value if v not in spec.choices]
            if bad:
                raise ConfigError(f"{name}={value}: {bad[0]!r} is not one of {', '.join(map(str, spec.choices))}; "
                                  "choose one or more of them")
        elif value not in spec.choices:
            raise ConfigError(f"{name}={value!r}: choose one of {', '.join(map(str, spec.choices))}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and spec.finite and not math.isfinite(value):
        bounds = range_text(spec)
        raise ConfigError(f"{name}={value}: must be a finite number{' ' + bounds if bounds else ''}{hint}")
    low_ok = (spec.ge is None or value >= spec.ge) and (spec.gt is None or value > spec.gt)
    high_ok = (spec.le is None or value <= spec.le) and (spec.lt is None or value < spec.lt)
    if not (low_ok and high_ok):
        raise ConfigError(f"{name}={value!r}: must be {range_text(spec)}{hint}")


def read_value(where: str, name: str, f: dataclasses.Field, tp, value):
    """convert() then check_value(): what every YAML value, flag and constructor argument goes through."""
    value = convert(where, tp, value)
    check_value(name, spec_of(f), value)
    return value


def check_fields(cfg) -> None:
    """Every field of a section against its declaration; values of the wrong type but the right meaning
    (an int for a float, '1e2' for an int) are stored converted."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        setattr(cfg, f.name, read_value(f.name, f.name, f, hints[f.name], getattr(cfg, f.name)))


class Section:
    """Base of the config sections: validate() checks each field against its declaration, then the rules
    that tie fields together (cross_checks)."""

    def validate(self) -> None:
        check_fields(self)
        self.cross_checks()

    def cross_checks(self) -> None:
        pass
