"""Click options generated from settings dataclasses, so that the CLI never copies a choice
list, a default or a help text: each field of a dataclass built with
`sparse_training.config.setting` becomes one option (--field-name, or the field's `flag`) whose
type comes from the annotation, whose choices and help come from the field, and whose
default is shown from the field's default.

Every option defaults to None on the click side, so a command knows exactly which values the
user typed (`given`); the dataclass fills in the rest. That is what lets flags override a
TOML file in `landscape train`."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Callable, Iterable

import click

ChoiceSource = Callable[[], Iterable[str]] | Iterable[str] | None


class Choice(click.Choice):
    """A choice whose error says what is unknown and lists what is known, on one line:
    `unknown pruner 'oracle'; choose one of random, magnitude, ...`."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if value in self.choices:
            return value
        what = (param.opts[0].lstrip("-").replace("-", " ") if param is not None and param.opts else "value")
        raise click.BadParameter(f"unknown {what} {value!r}; choose one of {', '.join(map(str, self.choices))}",
                                 ctx=ctx, param=param)


class LazyChoice(Choice):
    """A Choice whose list is read when first needed (a registry filled by imports)."""

    def __init__(self, source: Callable[[], Iterable[str]]):
        self._source = source
        super().__init__([])

    @property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._source())

    @choices.setter
    def choices(self, value: Any) -> None:  # click assigns [] in __init__
        pass


class FloatList(click.ParamType):
    """Comma-separated numbers: --milestones 0.5,0.75."""

    name = "numbers"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            return tuple(float(part) for part in str(value).split(",") if part.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of numbers, e.g. 0.5,0.75", param, ctx)


class TextList(click.ParamType):
    """Comma-separated names: --split train,test."""

    name = "names"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        return tuple(part.strip() for part in str(value).split(",") if part.strip())


class JsonObject(click.ParamType):
    """A JSON object: --model-kwargs '{"width": 2}'."""

    name = "json"

    def convert(self, value: Any, param: Any, ctx: Any) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            self.fail(f"must be a JSON object, e.g. '{{\"width\": 2}}', got {value!r}", param, ctx)
        return parsed


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _click_type(field: dataclasses.Field, hint: Any) -> Any:
    choices = field.metadata.get("choices")
    if choices is not None:
        return LazyChoice(choices) if callable(choices) else Choice(list(choices))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _click_type(field, next(arg for arg in args if arg is not type(None)))
    if origin is tuple:
        return FloatList() if args and args[0] is float else TextList()
    if origin is dict:
        return JsonObject()
    return {int: int, float: float, str: str}.get(hint, str)


def _default_text(field: dataclasses.Field) -> str:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        value = field.default
    if value is None or value == {}:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _is_bool(hint: Any) -> bool:
    return hint is bool


def settings_options(cls: type, *, prefix: str = "", exclude: Iterable[str] = (),
                     flags: dict[str, str] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one option per field of the dataclass `cls` (but `exclude`). The
    command receives each as `<prefix><field>` (None when not given). `flags` renames options
    for this command only ({field: "--flag"})."""
    hints = typing.get_type_hints(cls)
    skipped = set(exclude)

    def decorate(func: Callable) -> Callable:
        for field in reversed(dataclasses.fields(cls)):
            if field.name in skipped or not field.init:
                continue
            flag = (flags or {}).get(field.name) or flag_of(field)
            help_text = field.metadata.get("help", "")
            default = _default_text(field)
            if default and "[" not in help_text:
                help_text = f"{help_text} [{default}]"
            name = f"{prefix}{field.name}"
            if _is_bool(hints[field.name]):
                negative = "--no-" + flag[2:]
                func = click.option(f"{flag}/{negative}", name, default=None, help=help_text)(func)
            else:
                func = click.option(flag, name, type=_click_type(field, hints[field.name]), default=None,
                                    help=help_text, metavar=_metavar(field, hints[field.name]))(func)
        return func

    return decorate


def _metavar(field: dataclasses.Field, hint: Any) -> str | None:
    if field.metadata.get("choices") is not None:
        return None  # click lists the choices
    kind = _click_type(field, hint)
    if isinstance(kind, click.ParamType):
        return kind.name.upper()
    return {int: "INTEGER", float: "FLOAT", str: "TEXT"}.get(kind)


def given(cls: type, values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The fields of `cls` the user typed, from a command's keyword arguments."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {name[len(prefix):]: value for name, value in values.items()
            if name.startswith(prefix) and name[len(prefix):] in names and value is not None}


def build(cls: type, values: dict[str, Any], prefix: str = "", **fixed: Any) -> Any:
    """`cls` from the options typed (the dataclass's defaults for the rest) and `fixed`."""
    return cls(**{**given(cls, values, prefix), **fixed})
