"""The argparse side of the settings: one flag per field a command reads (config.py declares which),
the stage modules' own flags (CLI_FLAGS), and a parser whose every mistake is one line.

Flag values reach the fields as text and are read by config.build, with the same conversion and checks
as YAML values (fields.read_value), so `--lr 1e-3` and `lr: 1e-3` cannot disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing

from codetune.config import SECTIONS, ConfigError, build, flag_name, load_yaml, reads, sections_for
from codetune.fields import default_of, spec_of, strip_optional


class UsageError(ConfigError):
    """A command line argparse could not read: an unknown flag, a missing value."""


class Parser(argparse.ArgumentParser):
    """No prefix abbreviations (`--step` must not silently mean `--steps`), and errors as one line
    through main() instead of a usage block and sys.exit."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _show(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return " ".join(map(str, value)) or "none"
    if value is None:
        return "none"
    return str(value)


def positional_dest(section: str, name: str) -> str:
    return f"positional:{section}:{name}"  # no '.': not taken for a flag by from_args


def add_section_flags(parser: argparse.ArgumentParser, command: str, section: str) -> None:
    """One flag per field of `section` that `command` reads. Defaults are SUPPRESSed so that 'given' can
    be told from 'default' when merging with YAML (and by merge/generate: was --model given?)."""
    fields = reads(command, section)
    if not fields:
        return
    hints = typing.get_type_hints(SECTIONS[section])
    group = parser.add_argument_group(f"{section} settings (YAML section '{section}:')")
    for f in fields:
        spec = spec_of(f)
        tp, _ = strip_optional(hints[f.name])
        kw: dict = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                        help=help_with_default(spec.help, f"default: {_show(default_of(f))}"))
        if tp is bool:
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(tp) is list:
            group.add_argument(flag_name(f.name), nargs="+", metavar="X", **kw)
        else:  # text: config.build converts and checks it like a YAML value
            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else f.name.upper()
            group.add_argument(flag_name(f.name), metavar=metavar, **kw)
        if spec.positional:
            parser.add_argument(positional_dest(section, f.name), nargs="*", default=[], metavar=f.name.upper(),
                                help=f"same as {flag_name(f.name)} (added to it)")


def help_with_default(help_text: str, shown: str) -> str:
    """A help that already says what its default means ("default: the model's own") keeps its words."""
    return help_text if "default:" in help_text else f"{help_text} ({shown})"


def with_default(kwargs: dict) -> dict:
    """A stage module's flag with its default in its help, as the generated flags show theirs."""
    help_text = kwargs.get("help")
    if help_text is None or help_text == argparse.SUPPRESS:
        return kwargs
    if kwargs.get("required"):
        shown = "required"
    elif kwargs.get("action") in ("store_true", "store_false"):
        shown = "default: " + ("on" if kwargs.get("action") == "store_false" else "off")
    else:
        shown = f"default: {_show(kwargs.get('default'))}"
    return {**kwargs, "help": help_with_default(help_text, shown)}


def known_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [s for a in parser._actions for s in a.option_strings if s.startswith("--")]


def unknown_flag_message(command: str, flag: str, parser: argparse.ArgumentParser, readers: list[str]) -> str:
    """'--step': did you mean --steps?  '--fim-rate' on train: which command reads it."""
    if readers:
        return f"{flag} is not a setting of `codetune {command}` ({', '.join(readers)} read it): drop it here"
    near = difflib.get_close_matches(flag, known_flags(parser), n=1, cutoff=0.6)
    where = f"codetune {command}".strip()
    return f"unknown flag {flag}" + (f"; did you mean {near[0]}?" if near else f" (see {where} --help)")


def commands_reading(flag: str, commands) -> list[str]:
    name = flag[2:].replace("-", "_")
    if name.startswith("no_"):
        name = name[3:]
    for cls in SECTIONS.values():
        for f in dataclasses.fields(cls):
            if f.name == name:
                return [c for c in commands if c in spec_of(f).used_by]
    return []


def from_args(command: str, ns: argparse.Namespace) -> dict:
    """The command's sections from defaults <- --config YAML <- flags (and positional values)."""
    flags = {k: v for k, v in vars(ns).items() if "." in k}
    for key, value in vars(ns).items():
        if key.startswith("positional:") and value:
            _, section, name = key.split(":")
            flags[f"{section}.{name}"] = list(flags.get(f"{section}.{name}", [])) + list(value)
    yaml_data = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    return build(sections_for(command), yaml_data, flags, command=command)
