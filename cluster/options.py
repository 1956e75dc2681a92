"""The command line of every command, defined once for the `cluster` commands (cluster/cli/) and `python -m edge`
(edge/command.py, below the CLI): `settings_command` makes a command's options from its settings class
(cluster/role_settings.py), so a setting's flag, help and variable are written once, in its field."""

from __future__ import annotations

import functools
import inspect
import typing

import typer

from cluster import settings

ReadyFile = typer.Option(
    None,
    "--ready-file",
    help="Once listening, write the addresses really bound and the pid here (JSON). Port 0 in an address: any port.",
)


PrintConfig = typer.Option(
    False,
    "--print-config",
    help="Print the effective settings and where each came from (default, environment, flag), then exit.",
)


def _option(f, owner, annotation, names: tuple[str, ...]):
    """The typer option of a settings field: no default of its own (None: not given, so the variable or the
    field's default decides, and `--print-config` can tell which) and no envvar (cluster/settings.py reads those)."""
    kind = settings.base_type(annotation)
    unit = f.metadata["unit"]
    default = settings.field_default(f)
    help_text = f"{f.metadata['help']} [{settings.variable(owner, f)}; default {default}{' ' + unit if unit else ''}]"
    if kind is tuple:
        hint = list[str] | None
    elif kind is bool:
        hint = bool | None
        names = tuple(f"{n}/--no-{n[2:]}" for n in names)
    else:
        hint = kind | None
    return hint, typer.Option(None, *names, help=help_text, show_default=False)


def settings_command(cls):
    """Decorate `fn(settings, **own_options)` into a typer command whose options are also every flag of settings
    class `cls` (and --print-config): the command builds the settings object once (flags, then CLUSTER_*
    variables, then defaults) and hands it to `fn` whole. A bad value is said in one line (exit status 2)."""

    def decorate(fn):
        own = list(inspect.signature(fn).parameters.values())[1:]
        hints = typing.get_type_hints(fn)
        params, annotations, paths = [], {}, {}
        for param in own:
            params.append(param)
            annotations[param.name] = hints.get(param.name, param.annotation)
        owners = {path: owner for path, owner, _, _ in settings.walk(cls)}
        for path, f, annotation, names in settings.flag_fields(cls):
            name = f.name
            if name in annotations:
                raise TypeError(f"{cls.__name__}: option {name} twice")
            hint, option = _option(f, owners[path], annotation, names)
            paths[name] = path
            annotations[name] = hint
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hint))
        annotations["print_config"] = bool
        params.append(
            inspect.Parameter("print_config", inspect.Parameter.KEYWORD_ONLY, default=PrintConfig, annotation=bool)
        )

        @functools.wraps(fn)
        def command(**kwargs):
            flags = {paths[name]: kwargs.pop(name) for name in paths}
            print_config = kwargs.pop("print_config")
            try:
                built, origins = settings.load(cls, flags=flags)
            except settings.SettingsError as exc:
                typer.echo(f"{fn.__name__}: {exc}", err=True)
                raise typer.Exit(2) from None
            if print_config:
                print_settings(built, origins)
                raise typer.Exit(0)
            return fn(built, **kwargs)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = annotations
        del command.__wrapped__  # typer must see the new signature, not fn's
        command.settings_class = cls
        return command

    return decorate


def print_settings(built, origins) -> None:
    """One line per setting: name, value, variable, and where the value came from."""
    rows = settings.describe(built, origins)
    width = max(len(r[0]) for r in rows)
    value_width = min(40, max(len(r[1]) for r in rows))
    for name, value, variable, came in rows:
        typer.echo(f"{name:<{width}}  {value:<{value_width}}  {variable:<32}  {came}")


def need_role(*roles: str, what: str) -> None:
    """Stop `what` with a message naming what to install when a role's packages are not installed (an edge or
    broker node's slim install has no torch): an ImportError's traceback would say less."""
    from cluster.dependencies import missing

    absent = missing(*roles)
    if absent:
        extras = ",".join(roles)
        typer.echo(
            f"{what} needs {', '.join(absent)}, not installed here: install the full package "
            f"(pip install -c constraints.txt .) or this role's extra of the slim one "
            f"(pip install -c constraints.lock './slim[{extras}]'); README, Install by role",
            err=True,
        )
        raise typer.Exit(2)
