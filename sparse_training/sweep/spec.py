"""A sweep's spec (TOML: [base], [grid], [analyses]), checked whole before anything runs: the
keys are the `landscape train` flag names (with _ or -), the grid is the Cartesian product of
its lists in the order written, and every grid point's full config is built and resolved.

Flag names reach this module from the command line layer (`keys`: flag name -> (section,
field), made by cli/options.py's naming) so that the library never imports `cli`."""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError

TABLES = ("base", "grid", "analyses")
ANALYSES = ("connectivity", "sharpness", "signs", "overlap")  # the analyses whose command takes one run
# Keys the sweep decides, and what to do instead.
RESERVED = {
    "out": "the sweep puts each run in SWEEP/runs/NAME",
    "resume": "the sweep continues unfinished runs by itself",
    "config": "the spec is the config",
    "device": "the device is a sweep option: pass `landscape sweep --device ...`",
    "download": "only the command line downloads: fetch the data once with `landscape train --download`",
}
NAME_LIMIT = 200  # characters of a run directory's name (file systems allow 255 bytes)
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")

Keys = dict[str, tuple[str, str]]  # flag name without dashes -> (config section, field)
AnalysisArgs = Callable[[str, dict[str, Any]], list[str]]  # (analysis, options) -> its command's arguments


@dataclass(frozen=True)
class PlannedRun:
    """One grid point: its run name, its values (grid keys as written in the spec, canonical
    flag names) and the raw config {section: {field: value}} `landscape train --config` reads."""

    name: str
    point: dict[str, Any]
    config: dict[str, dict[str, Any]]


@dataclass(frozen=True)
class Spec:
    text: str
    raw: dict[str, Any]
    base: dict[str, Any]                  # canonical flag name -> value
    grid: dict[str, list[Any]]            # canonical flag name -> values, in the order written
    analyses: dict[str, list[str]]        # analysis -> its command's arguments (no RUN, --out, --device)
    runs: list[PlannedRun] = field(default_factory=list)


def read_spec(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise UserError(f"sweep spec {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read sweep spec {path}: {getattr(error, 'strerror', None) or error}") from None


def parse_spec(text: str, keys: Keys, analysis_args: AnalysisArgs | None = None, where: str = "spec") -> Spec:
    """The spec from its TOML text, every key, value and grid point checked (UserError, one line)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UserError(f"{where} is not valid TOML: {error}") from None
    unknown = [k for k in raw if k not in TABLES]
    if unknown:
        raise UserError(f"{where}: unknown table(s) {unknown}; a sweep spec has [base], [grid] and [analyses]")
    for table in TABLES:
        if table in raw and not isinstance(raw[table], dict):
            raise UserError(f"{where}: {table} must be a table: write [{table}] above its keys")
    base = _settings(raw.get("base", {}), "base", keys, where)
    grid = _settings(raw.get("grid", {}), "grid", keys, where)
    if not grid:
        raise UserError(f"{where}: [grid] needs at least one key with a list of values, e.g. seed = [0, 1]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: [grid] {key} must be a non-empty list of values, e.g. {key} = [{_toml(values)}]"
                            if not isinstance(values, list) else f"{where}: [grid] {key} is an empty list; give it "
                            "at least one value or move it out of [grid]")
    both = sorted(set(base) & set(grid))
    if both:
        raise UserError(f"{where}: {both[0]} is in both [base] and [grid]; keep it in one of them")
    for key, value in [*base.items(), *((k, v) for k, vs in grid.items() for v in vs)]:
        _check_value(key, value, where)
    analyses = _analyses(raw.get("analyses", {}), analysis_args, where)
    spec = Spec(text, raw, base, grid, analyses)
    return Spec(text, raw, base, grid, analyses, plan(spec, keys, where))


def _settings(table: dict[str, Any], name: str, keys: Keys, where: str) -> dict[str, Any]:
    """{canonical flag name: value} of a [base] or [grid] table; unknown and reserved keys refused."""
    settings: dict[str, Any] = {}
    for written, value in table.items():
        key = written.replace("_", "-")
        if key in RESERVED:
            raise UserError(f"{where}: [{name}] {written}: {RESERVED[key]}; drop it from the spec")
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=3)
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise UserError(f"{where}: [{name}] {written} is not a `landscape train` option{hint}; see "
                            "`landscape train --help` for the names (written with _ or -)")
        if key in settings:
            raise UserError(f"{where}: [{name}] names {key} twice (with _ and with -); keep one")
        settings[key] = _parsed(key, value, keys, where)
    return settings


def _parsed(key: str, value: Any, keys: Keys, where: str) -> Any:
    """model-kwargs may be a table or a JSON string, in [base] and in each [grid] value."""
    if keys[key] != ("model", "kwargs"):
        return value
    if isinstance(value, list):
        return [_parsed(key, v, keys, where) for v in value]
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            raise UserError(f"{where}: {key} must be a table or a JSON object, e.g. {key} = {{width = 8}}")
    return value


def _check_value(key: str, value: Any, where: str) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _check_value(key, v, where)
    elif isinstance(value, list):
        for v in value:
            _check_value(key, v, where)
    elif not isinstance(value, (str, int, float, bool)):
        raise UserError(f"{where}: {key} = {value!r} is not a string, number, boolean, list or table")


def _analyses(table: dict[str, Any], analysis_args: AnalysisArgs | None, where: str) -> dict[str, list[str]]:
    analyses = {}
    for name, options in table.items():
        if name not in ANALYSES:
            raise UserError(f"{where}: [analyses] {name} is not an analysis a sweep runs; choose from "
                            f"{', '.join(ANALYSES)}")
        if options is False:
            continue
        if options is not True and not isinstance(options, dict):
            raise UserError(f"{where}: [analyses] {name} must be true, false or a table of its options, e.g. "
                            f"{name} = {{...}} with `landscape {name} --help`'s option names")
        options = {} if options is True else options
        for key, value in options.items():
            _check_value(f"[analyses] {name}: {key}", value, where)
        try:
            analyses[name] = analysis_args(name, options) if analysis_args is not None else []
        except UserError as error:
            raise UserError(f"{where}: {error}") from None
    return analyses


# ---------------------------------------------------------------- grid points, names, configs

def plan(spec: Spec, keys: Keys, where: str = "spec") -> list[PlannedRun]:
    """Every grid point, first key slowest, with its name and config; names checked unique."""
    runs, seen = [], {}
    for values in itertools.product(*spec.grid.values()):
        point = dict(zip(spec.grid, values))
        name = run_name(point)
        if name in seen:
            raise UserError(f"{where}: grid points {seen[name]} and {point} give the same run name {name}; "
                            "list each value once")
        seen[name] = point
        config: dict[str, dict[str, Any]] = {}
        for key, value in {**spec.base, **point}.items():
            section, name_ = keys[key]
            config.setdefault(section, {})[name_] = value
        runs.append(PlannedRun(name, point, config))
    return runs


def run_name(point: dict[str, Any]) -> str:
    """`key=value,key=value` in grid order: `sparsity=0.5,seed=0`. Numbers by their shortest
    round-trip form (0.5 and 0.50 are one run; 1 and 1.0 are not), characters other than
    letters, digits and . _ + - replaced by _ with a hash of the value appended so that
    distinct values never share a name."""
    name = ",".join(f"{key}={_value_text(value)}" for key, value in point.items())
    if len(name) > NAME_LIMIT:
        name = name[:NAME_LIMIT - 13] + "~" + _digest(json.dumps(point, sort_keys=True))
    return name


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "-".join(_value_text(v) for v in value)
    if isinstance(value, dict):
        text = "_".join(f"{k}-{_value_text(v)}" for k, v in sorted(value.items()))
        return _SAFE.sub("_", text) + "~" + _digest(json.dumps(value, sort_keys=True))
    text = str(value)
    safe = _SAFE.sub("_", text)
    return safe if safe == text and not text.startswith(".") else safe + "~" + _digest(text)


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def to_toml(config: dict[str, dict[str, Any]]) -> str:
    """A run's config as the TOML `landscape train --config` reads: one table per section."""
    lines = []
    for section, values in config.items():
        lines.append(f"[{section}]")
        lines += [f"{_key(k)} = {_toml(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        # a TOML basic string: JSON's escapes are TOML's (non-ASCII written as is, DEL escaped)
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(str(k))} = {_toml(v)}" for k, v in value.items()) + "}"
    raise UserError(f"{value!r} cannot be written to TOML")


def validate_configs(spec: Spec, device: str, where: str = "spec") -> None:
    """Build and resolve every grid point's config, as `landscape train` will: the first bad
    point is a UserError naming it."""
    from ..config import Config, resolve

    for run in spec.runs:
        raw = {section: dict(values) for section, values in run.config.items()}
        raw.setdefault("run", {})["device"] = device
        try:
            resolve(Config.from_dict(raw))
        except UserError as error:
            raise UserError(f"{where}: run {run.name}: {error}") from None


# ---------------------------------------------------------------- a rerun into the same sweep

def check_compatible(stored: dict[str, Any], spec: Spec, keys: Keys, sweep: Path) -> None:
    """A rerun into an existing sweep must keep [base] and the grid's keys; it may add grid
    values (new runs), never drop them. [analyses] may change (an output already there is kept)."""
    try:
        old = parse_spec(stored["spec_text"], keys, None, where=f"{sweep}/sweep.json")
    except (KeyError, TypeError):
        raise UserError(f"{sweep}/sweep.json is not a sweep record; choose another --out") from None
    if old.base != spec.base:
        changed = sorted(k for k in set(old.base) | set(spec.base) if old.base.get(k) != spec.base.get(k))
        raise UserError(f"{sweep} holds a sweep with another [base] ({', '.join(changed)} differ); use the same "
                        "[base], or another --out")
    if list(old.grid) != list(spec.grid):
        raise UserError(f"{sweep} holds a sweep over {', '.join(old.grid)}; keep those grid keys in that order, "
                        "or use another --out")
    for key, values in old.grid.items():
        new = {_value_text(v) for v in spec.grid[key]}
        dropped = [v for v in values if _value_text(v) not in new]
        if dropped:
            raise UserError(f"{sweep} already has runs with {key} = {_toml(dropped)}; a rerun may add grid values "
                            "but not drop them: list them again, or use another --out")
