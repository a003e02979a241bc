"""Command-line flags generated from a config dataclass, so every default lives in one place.

A field becomes ``--its-name`` with the field's default, its ``help`` and ``choices`` from
`option` metadata; ``bool`` fields with default False become switches. Fields declared with
``flag=False`` (nested configs, values set by the launcher) get no flag. A field for an
optimizer option is declared with `optimizer_option`: its help, choices and default come from
`distributed_muon.options.OPTIONS`, and `check_optimizer_options` checks it by that table.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from distributed_muon.options import OPTIONS, add_former_flags

_TABLE = object()  # "as distributed_muon.options.OPTIONS has it"


def option(default: Any, help: str, *, choices: tuple | None = None,
           flag: bool = True) -> Any:
    """A dataclass field with its command-line help (``default`` may be a factory's result
    for immutable values only)."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "choices": choices, "flag": flag})


def optimizer_option(name: str, *, default: Any = _TABLE, why: str = "", note: str = "") -> Any:
    """A field for the optimizer option ``name`` (`distributed_muon.options.OPTIONS`). A
    ``default`` of its own needs ``why`` (tests/test_options.py holds surfaces to the table);
    ``note`` is appended to the table's help."""
    spec = OPTIONS[name]
    if default is not _TABLE and not why:
        raise ValueError(f"{name}: a default other than the options table's needs its reason")
    text = spec.help + (f"; {note}" if note else "")
    return dataclasses.field(
        default=spec.default if default is _TABLE else default,
        metadata={"help": text, "choices": spec.choices, "flag": True, "option": name,
                  "why": why})


def check_optimizer_options(config: Any) -> None:
    """Check every `optimizer_option` field of ``config`` that is set by the options table;
    the error names the flag."""
    for f in dataclasses.fields(config):
        name, value = f.metadata.get("option"), getattr(config, f.name)
        if name is None or value is None:
            continue
        try:
            OPTIONS[name].check(name, value)
        except ValueError as err:
            reason = str(err).split(" is not valid: ", 1)[-1]
            raise ValueError(f"--{f.name.replace('_', '-')} {value}: {reason}") from None


def _base_type(annotation: Any) -> type:
    """``int | None`` -> ``int``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("flag", False):
            continue
        name = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        text = meta["help"]
        if kind is bool:
            parser.add_argument(name, action="store_true", default=f.default, help=text)
            continue
        if f.default is not None:
            text += f" (default {f.default})"
        parser.add_argument(name, type=kind, default=f.default, choices=meta["choices"],
                            help=text, metavar=None if meta["choices"] else f.name.upper())
        if "option" in meta:  # its former names stay flags, with a line saying which to use
            add_former_flags(parser, meta["option"], name, f.name, type=kind,
                             choices=meta["choices"])


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """The config with every flagged field taken from parsed ``args``."""
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("flag", False)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})
