"""One declaration per setting: type, default, help and check together.

Every settings dataclass (``TrainConfig``, ``DataConfig``, ``ModelConfig``, ``PackConfig``,
...) declares each field as ``name: Type = setting(default, "help", check=...)``:

- the type annotation is the type (``Literal[...]`` for a fixed set of choices);
- ``help`` is what ``--help`` prints (no second copy in a parser or a comment);
- ``check`` is a ``(predicate, "what is allowed")`` pair, e.g. :func:`at_least`.

:func:`check_fields` (called from each dataclass's ``__post_init__``) applies the choices
and the checks with one message format, ``invalid setting section.name=value: allowed``.
:func:`add_arguments` derives argparse options from the same declarations (``jsm-pack``).
This module is a leaf: it imports nothing from the package.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal

Check = tuple[Callable[[Any], bool], str]


def setting(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    check: Check | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with its help text and check in the field's metadata."""
    metadata = {"help": help, "check": check}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def at_least(lo: float) -> Check:
    return (lambda v: v >= lo, f"must be >= {lo}")


def above(lo: float) -> Check:
    return (lambda v: v > lo, f"must be > {lo}")


def within(lo: float, hi: float, *, hi_open: bool = False) -> Check:
    if hi_open:
        return (lambda v: lo <= v < hi, f"must be in [{lo}, {hi})")
    return (lambda v: lo <= v <= hi, f"must be in [{lo}, {hi}]")


def choices_of(typ: Any) -> tuple | None:
    """The allowed values of a ``Literal[...]`` type (also inside ``Optional``), else None."""
    if typing.get_origin(typ) is Literal:
        return typing.get_args(typ)
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        for arg in typing.get_args(typ):
            found = choices_of(arg)
            if found:
                return found
    return None


def field_types(cls: type) -> dict[str, Any]:
    """Resolved annotation of every field (``from __future__ import annotations`` safe)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def help_of(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def check_fields(obj: Any, section: str) -> None:
    """Validate ``obj``'s fields against their Literal choices and declared checks."""
    hints = field_types(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        choices = choices_of(hints[f.name])
        if choices is not None and value not in choices and value is not None:
            raise ValueError(f"invalid setting {section}.{f.name}={value!r}: one of {choices}")
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise ValueError(f"invalid setting {section}.{f.name}={value!r}: {check[1]}")


def add_arguments(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    names: Iterable[str],
    *,
    required: Iterable[str] = (),
) -> None:
    """argparse options ``--the-name`` for fields ``names`` of ``cls``, from their declarations.

    Bools with a true default become ``--no-the-name`` (store_false), other bools
    ``--the-name`` (store_true); ``Literal`` fields get ``choices``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = field_types(cls)
    required = set(required)
    for name in names:
        f, typ = fields[name], hints[name]
        flag = "--" + name.replace("_", "-")
        default = default_of(f)
        text = help_of(f)
        if typ is bool:
            if default is True:
                off = f"turn off: {text}" if text else None
                parser.add_argument(
                    "--no-" + name.replace("_", "-"), dest=name, action="store_false", help=off
                )
            else:
                parser.add_argument(flag, dest=name, action="store_true", help=text)
            continue
        kwargs: dict[str, Any] = {"dest": name, "help": text}
        choices = choices_of(typ)
        if choices is not None:
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif typ in (int, float, str):
            kwargs["type"] = typ
        if name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
            kwargs["help"] = f"{text} (default: {default!r})" if text else None
        parser.add_argument(flag, **kwargs)
