"""Settings as data: each role's settings are one frozen dataclass whose fields say their default, check, unit, help
and environment variable; this module reads them (the one place that reads the environment), prints them with where
each came from, and writes them back for child processes.

The one naming rule: a field's variable is CLUSTER_ + the class's `env_prefix` (usually empty) + the field's name in
capitals (Timings.heartbeat_interval: CLUSTER_HEARTBEAT_INTERVAL), unless the field names its variable itself (kept
where an older name was already in use: EdgeSettings.max_body_bytes is CLUSTER_EDGE_MAX_BODY). A field whose type is
another settings class is a group (Addresses, Timings): its fields are read by the same rule. Precedence: flag, then
variable, then default.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, field, fields, is_dataclass

ENV_PREFIX = "CLUSTER_"
DEFAULT, ENVIRONMENT, FLAG = "default", "environment", "flag"


class SettingsError(ValueError):
    """A setting's value is not of its type or fails its check; the message names the variable or flag."""


def setting(
    default=MISSING,
    help: str = "",
    *,
    unit: str = "",
    check: tuple[Callable[[typing.Any], bool], str] | None = None,
    flag: str | None = None,
    env: str | None = None,
    factory: Callable[[], typing.Any] | None = None,
):
    """A settings field: default, help (one line), unit (s, ms, MiB, bytes...), check (predicate, what it wants),
    flag (its option name on every command that takes it), env (only to keep an older variable name)."""
    meta = dict(help=help, unit=unit, check=check, flag=flag, env=env)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def at_least(low):
    """A setting's check: >= low."""
    return (lambda v: v >= low, f">= {low}")


def above(low):
    """A setting's check: > low."""
    return (lambda v: v > low, f"> {low}")


def one_of(choices: tuple[str, ...]):
    """A setting's check: one of `choices`."""
    return (lambda v: v in choices, "one of " + ", ".join(choices))


def group(cls, *, flags: typing.Iterable[str] = ()):
    """A nested settings class. flags: which of its fields this role takes on its command line (all read their
    variable). A role class's `flag_aliases` (dotted path -> names) keeps older option names working on its command
    (the manager's --queries for --manager-queries), hidden from nothing: --help shows them beside the flag."""
    return field(default_factory=cls, metadata=dict(group=True, flags=tuple(flags)))


def variable(cls, f: dataclasses.Field) -> str:
    """The environment variable of a field: the one naming rule."""
    return f.metadata.get("env") or ENV_PREFIX + getattr(cls, "env_prefix", "") + f.name.upper()


def is_group(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("group"))


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def base_type(annotation) -> type:
    """int for `int | None`, tuple for `tuple[str, ...]`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return base_type(args[0])
    return origin or annotation


def parse(annotation, raw: str, where: str):
    """A variable's text as the field's type (an int takes "3" and "3.0"; a bool 1/0/true/false/yes/no; a tuple of
    strings is split on whitespace, as options given several times)."""
    kind = base_type(annotation)
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is int:
            number = float(raw)
            if number != int(number):
                raise ValueError(raw)
            return int(number)
        if kind is float:
            return float(raw)
        if kind is tuple:
            return tuple(raw.split())
        return raw
    except ValueError:
        raise SettingsError(f"{where}={raw!r}: not a valid {kind.__name__}") from None


def _coerce(annotation, value):
    kind = base_type(annotation)
    if value is None:
        return None
    if kind is tuple:
        return tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def walk(cls, path: str = "") -> Iterator[tuple[str, type, dataclasses.Field, typing.Any]]:
    """Every leaf field of a settings class, groups flattened: (dotted path, owning class, field, annotation)."""
    hints = _hints(cls)
    for f in fields(cls):
        if is_group(f):
            yield from walk(hints[f.name], f"{path}{f.name}.")
        else:
            yield f"{path}{f.name}", cls, f, hints[f.name]


def flag_fields(cls) -> Iterator[tuple[str, dataclasses.Field, typing.Any, tuple[str, ...]]]:
    """The fields a role's command takes as options: (dotted path, field, annotation, option names)."""
    hints = _hints(cls)
    aliases = getattr(cls, "flag_aliases", {})
    for f in fields(cls):
        if is_group(f):
            inner = {p: (g, a) for p, _, g, a in walk(hints[f.name])}
            for name in f.metadata["flags"]:
                g, a = inner[name]
                path = f"{f.name}.{name}"
                yield path, g, a, (g.metadata["flag"], *aliases.get(path, ()))
        elif f.metadata.get("flag"):
            yield f.name, f, hints[f.name], (f.metadata["flag"], *aliases.get(f.name, ()))


def environment() -> dict[str, str]:
    """A copy of this process's environment (for a child process's, with settings written by `to_env`)."""
    return dict(os.environ)


def load(cls, environ: Mapping[str, str] | None = None, flags: Mapping[str, typing.Any] | None = None):
    """(settings, origins): `cls` from its flags (dotted path -> value; None: not given), then its variables, then
    its defaults, every value checked. origins: dotted path -> (DEFAULT | ENVIRONMENT | FLAG, the variable or flag)."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != [] and v != ()}
    origins: dict[str, tuple[str, str]] = {}
    return _build(cls, "", environ, flags, origins), origins


def from_env(cls, environ: Mapping[str, str] | None = None):
    """`cls` from its variables and defaults (a library caller with no command line: Client, ManagerClient)."""
    return load(cls, environ)[0]


def _build(cls, path: str, environ, flags, origins):
    hints = _hints(cls)
    values = {}
    for f in fields(cls):
        dotted = path + f.name
        if is_group(f):
            values[f.name] = _build(hints[f.name], dotted + ".", environ, flags, origins)
            continue
        name = variable(cls, f)
        if dotted in flags:
            value, origins[dotted] = _coerce(hints[f.name], flags[dotted]), (FLAG, f.metadata.get("flag") or "")
        elif environ.get(name):  # set and not empty (an empty variable is unset, as it was for the flags)
            value, origins[dotted] = parse(hints[f.name], environ[name], name), (ENVIRONMENT, name)
        else:
            continue
        values[f.name] = value
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise SettingsError(f"{origins[dotted][1] or name}={value!r}: {f.name} must be {check[1]}")
    obj = cls(**values)
    for dotted, *_ in walk(cls, path):
        origins.setdefault(dotted, (DEFAULT, ""))
    cross = getattr(obj, "problems", None)
    if cross is not None:
        problem = cross()
        if problem:
            raise SettingsError(problem)
    return obj


def get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def to_env(obj, only: typing.Iterable[str] | None = None) -> dict[str, str]:
    """The variables that give a process these settings (its values as text; None values left out)."""
    out = {}
    wanted = None if only is None else set(only)
    for dotted, owner, f, _ in walk(type(obj)):
        value = get(obj, dotted)
        if value is None or (wanted is not None and dotted not in wanted):
            continue
        if isinstance(value, tuple):
            value = " ".join(value)
        elif isinstance(value, bool):
            value = "1" if value else "0"
        out[variable(owner, f)] = str(value)
    return out


def show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value) if value else "(none)"
    if value is None:
        return "(none)"
    return str(getattr(value, "value", value))


def describe(obj, origins: Mapping[str, tuple[str, str]]) -> list[tuple[str, str, str, str]]:
    """(setting, value, variable, where it came from) for every field, for `--print-config` and `cluster config`."""
    rows = []
    for dotted, owner, f, _ in walk(type(obj)):
        source, name = origins.get(dotted, (DEFAULT, ""))
        came = source if source == DEFAULT else f"{source} {name}"
        rows.append((dotted, show(get(obj, dotted)), variable(owner, f), came))
    return rows


def table_rows(classes: Mapping[str, type]) -> list[dict]:
    """One row per variable over every role's settings class: flag, variable, default, unit, meaning, roles (the
    commands that take its flag; for a variable without one, those that read it, "every role" for most)."""
    rows: dict[str, dict] = {}
    for role, cls in classes.items():
        flagged = {path: names[0] for path, _, _, names in flag_fields(cls)}
        for dotted, owner, f, _ in walk(cls):
            name = variable(owner, f)
            row = rows.setdefault(name, dict(variable=name, flag="", default=field_default(f), unit=f.metadata["unit"]))
            row.setdefault("help", f.metadata["help"])
            row.setdefault("flagged", []), row.setdefault("read", [])
            row["read"] += [role] if role not in row["read"] else []
            if dotted in flagged:
                row["flag"] = flagged[dotted]
                row["flagged"] += [role] if role not in row["flagged"] else []
    for row in rows.values():
        row["roles"] = row["flagged"] or (["every role"] if len(row["read"]) >= 5 else row["read"])
    return sorted(rows.values(), key=lambda r: r["variable"])


def field_default(f: dataclasses.Field) -> str:
    if f.default is not MISSING:
        return show(f.default)
    if f.default_factory is not MISSING:
        return show(f.default_factory())
    return ""


def markdown(classes: Mapping[str, type]) -> str:
    """The README's table of every setting (`cluster config --markdown`)."""
    lines = ["| flag | variable | default | unit | meaning | roles |", "| --- | --- | --- | --- | --- | --- |"]
    for r in table_rows(classes):
        flag = f"`{r['flag']}`" if r["flag"] else ""
        meaning = r["help"].replace("|", "\\|")
        default = r["default"].replace("|", "\\|")
        lines.append(
            f"| {flag} | `{r['variable']}` | `{default}` | {r['unit']} | {meaning} | {', '.join(r['roles'])} |"
        )
    return "\n".join(lines) + "\n"


def assert_settings_class(cls) -> None:
    """Every field of a settings class has help text (the README table and --help are made from it)."""
    assert is_dataclass(cls), cls
    for _, owner, f, _ in walk(cls):
        assert f.metadata.get("help"), f"{owner.__name__}.{f.name} has no help"


def xdg_dir(name: str, fallback: str) -> str:
    """An XDG base directory (XDG_DATA_HOME, XDG_CACHE_HOME), else `fallback` under the home directory."""
    return os.environ.get(name) or os.path.join(os.path.expanduser("~"), fallback)
