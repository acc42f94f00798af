"""Command-line flags generated from pydantic fields, so that a setting is declared once.

A `Flag` names one field by its dotted path in a schema: ``teacher.train.epochs`` in `Recipe`,
or ``out`` in a command's `Inputs`. The flag's type, choices, default and help are read off that
field (its ``description`` is the help); argparse stores nothing for a flag that is not given,
so the field's own default applies. A `Command` is a function, the `Inputs` model of its own
flags (every field is one) and the recipe keys it exposes as flags.
"""

from __future__ import annotations

import argparse
import json
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from tasprune.config import Recipe, deep_merge, load_recipe, parse_overrides
from tasprune.errors import ConfigError

__all__ = [
    "INPUTS",
    "RECIPE",
    "Command",
    "FieldRef",
    "Flag",
    "Inputs",
    "RecipeInputs",
    "field_at",
    "given",
]

RECIPE, INPUTS = "recipe", "inputs"  # the schema a flag's argparse dest (``TAG:key``) belongs to


@dataclass(frozen=True)
class Flag:
    """One flag for one field; ``key`` is the field's dotted path in its schema."""

    key: str
    name: str = ""  # the flag's name when it is not the field's own (``--data`` for data.name)
    required: bool = False  # required by this command although the field has a default
    help: str = ""  # only for a field whose class carries no description (not ours to edit)


@dataclass(frozen=True)
class FieldRef:
    """A field found by its dotted path: its pydantic info, its type without ``None``, and its
    default in the schema (``PydanticUndefined`` when it has none)."""

    key: str
    info: FieldInfo
    kind: Any
    optional: bool
    default: Any

    @property
    def extra(self) -> dict[str, Any]:
        """The field's ``json_schema_extra`` (positional, short, metavar, choices)."""
        extra = self.info.json_schema_extra
        return dict(extra) if isinstance(extra, dict) else {}


def field_at(schema: type[BaseModel], key: str) -> FieldRef:
    """The field of ``schema`` at dotted ``key``. Its default is the schema's: a nested model's
    default instance wins over the nested class's own (``teacher.train.epochs`` is 30)."""
    model, holder = schema, None  # holder: the default instance of the section walked into
    parts = key.split(".")
    for i, part in enumerate(parts):
        info = model.model_fields.get(part)
        if info is None:
            raise KeyError(f"{schema.__name__} has no field {key!r}")
        if holder is not None:
            default = getattr(holder, part)
        else:
            default = info.get_default(call_default_factory=True)
        kind, optional = _without_none(info.annotation)
        if i == len(parts) - 1:
            return FieldRef(key, info, kind, optional, default)
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            raise KeyError(f"{schema.__name__}.{'.'.join(parts[: i + 1])} is not a section")
        model, holder = kind, default if isinstance(default, BaseModel) else None
    raise KeyError(key)


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """``int | None`` -> (int, True); ``int`` -> (int, False)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return rest[0], True
    return annotation, False


def _on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"invalid choice: {text!r} (choose from 'on', 'off')")
    return text == "on"


def _value_kwargs(ref: FieldRef) -> dict[str, Any]:
    """argparse's type/nargs/choices/action for a field's type."""
    kind, origin = ref.kind, get_origin(ref.kind)
    if kind is bool and ref.optional:  # unset = decided elsewhere; the flag says on or off
        return {"type": _on_off, "metavar": "{on,off}"}
    if kind is bool:  # a switch: giving the flag stores the other value
        return {"action": "store_const", "const": not ref.default}
    if "choices" in ref.extra:
        return {"choices": tuple(ref.extra["choices"])}
    if origin is Literal:
        return {"choices": get_args(kind)}
    if origin is tuple:
        args = get_args(kind)
        if len(args) == 2 and args[1] is Ellipsis:
            return {"type": args[0], "nargs": "+"}
        return {"type": args[0], "nargs": len(args)}
    if origin is list:
        return {"type": get_args(kind)[0], "action": "append"}
    if kind in (int, float, str):
        return {"type": kind}
    if kind is Path:
        return {"type": str}  # pydantic makes the Path
    raise TypeError(f"no flag for field {ref.key!r} of type {kind!r}")


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)


def _help(ref: FieldRef, flag: Flag, tag: str, kwargs: dict[str, Any]) -> str:
    """The field's description, then (for a recipe flag) the key it sets and its default."""
    text = ref.info.description or flag.help
    if not text:
        raise TypeError(f"field {ref.key!r} has no description: give it Field(description=...)")
    notes = [ref.key] if tag == RECIPE else []
    if kwargs.get("action") == "store_const":
        if tag == RECIPE:
            notes = [f"{ref.key}: {_shown(kwargs['const'])}"]
    elif not flag.required and ref.default not in (None, PydanticUndefined, [], ()):
        notes.append(f"default {_shown(ref.default)}")
    if notes:
        text += f" [{'; '.join(notes)}]"
    return text.replace("%", "%%")  # argparse %-formats help


def add_flags(
    parser: argparse.ArgumentParser, schema: type[BaseModel], flags: Iterable[Flag], tag: str
) -> None:
    """Add one argparse argument per flag, with dest ``TAG:key`` and nothing stored unless
    given."""
    for flag in flags:
        ref = field_at(schema, flag.key)
        own = (ref.info.alias or ref.key.rsplit(".", 1)[-1]).replace("_", "-")
        if ref.kind is bool and not ref.optional and ref.default is True and not flag.name:
            raise TypeError(f"the switch of {ref.key!r} stores false: give it a Flag name")
        kwargs = _value_kwargs(ref)
        kwargs["help"] = _help(ref, flag, tag, kwargs)
        dest = f"{tag}:{flag.key}"
        metavar = ref.extra.get("metavar")
        if ref.extra.get("positional"):
            if kwargs.pop("action", None) == "append":
                kwargs["nargs"] = argparse.REMAINDER
            parser.add_argument(dest, metavar=metavar or ref.key, **kwargs)
            continue
        if "type" in kwargs and "metavar" not in kwargs:
            if isinstance(metavar, list):
                metavar = tuple(metavar)
            kwargs["metavar"] = metavar or (flag.name or own).upper().replace("-", "_")
        names = [ref.extra["short"]] if "short" in ref.extra else []
        parser.add_argument(
            *names,
            f"--{flag.name or own}",
            dest=dest,
            default=argparse.SUPPRESS,
            required=flag.required or ref.default is PydanticUndefined,
            **kwargs,
        )


def given(namespace: argparse.Namespace, tag: str) -> dict[str, Any]:
    """The flags of schema ``tag`` that were given, as the nested mapping of their keys."""
    out: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        prefix, _, key = dest.partition(":")
        if prefix != tag:
            continue
        node = out
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return out


class Inputs(BaseModel):
    """A command's own flags, every field one; subclasses add theirs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quiet: bool = Field(
        default=False, description="only warnings and errors", json_schema_extra={"short": "-q"}
    )
    debug: bool = Field(default=False, description="show tracebacks (or TASPRUNE_DEBUG=1)")

    def assemble(self, flags: dict[str, Any]) -> Recipe:
        """The command's recipe: built-in defaults < the recipe flags given."""
        return load_recipe(None, flags)


class RecipeInputs(Inputs):
    """Flags of a command that reads a recipe: defaults < ``--config`` < ``--set`` < flags."""

    config: str | None = Field(
        default=None,
        description="recipe: the name of a shipped recipe (e.g. fmnist-r20-quick) or a YAML file",
    )
    sets: list[str] = Field(
        default_factory=list,
        alias="set",
        description="override a recipe key, e.g. --set search.arch_lr=0.05 (repeatable)",
        json_schema_extra={"metavar": "KEY=VALUE"},
    )

    def assemble(self, flags: dict[str, Any]) -> Recipe:
        return load_recipe(self.config, deep_merge(parse_overrides(self.sets), flags))


@dataclass(frozen=True)
class Command:
    """A sub-command: ``run(inputs)``, or ``run(inputs, recipe)`` when it has recipe flags."""

    name: str
    run: Callable[..., int]
    help: str
    inputs: type[Inputs] = Inputs
    flags: tuple[Flag, ...] = ()  # the recipe keys it sets, one flag each

    def add_to(self, commands: Any, formatter: type[argparse.HelpFormatter]) -> None:
        """Add this command's parser to ``commands`` (argparse's sub-parsers)."""
        p = commands.add_parser(
            self.name, help=self.help, description=self.run.__doc__, formatter_class=formatter
        )
        add_flags(p, self.inputs, [Flag(name) for name in self.inputs.model_fields], INPUTS)
        add_flags(p, Recipe, self.flags, RECIPE)

    def __call__(self, namespace: argparse.Namespace) -> int:
        inputs = _validated(self.inputs, given(namespace, INPUTS))
        if not self.flags:
            return self.run(inputs)
        return self.run(inputs, inputs.assemble(given(namespace, RECIPE)))


def _validated(cls: type[Inputs], values: dict[str, Any]) -> Inputs:
    """``cls`` from the given flags (keyed by field name); a bad value is one line naming the
    flag."""
    by_alias = {cls.model_fields[k].alias or k: v for k, v in values.items()}
    try:
        return cls.model_validate(by_alias)
    except ValidationError as err:
        first = err.errors()[0]
        flag = "--" + str(first["loc"][0] if first["loc"] else "").replace("_", "-")
        raise ConfigError(
            f"{flag} {first.get('input')!r} is invalid ({first['msg']}). Fix: correct that flag"
        ) from None
