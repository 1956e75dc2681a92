"""The command-line options every role's command shares (typer), defined once: the `cluster` commands (cluster/cli/)
and `python -m edge` (edge/command.py, below the CLI) both take them from here."""

from __future__ import annotations

import enum
import functools
import inspect
import typing

import typer

from cluster import config, settings

BrokerClients = typer.Option(
    config.BROKER_CLIENT_ADDR, envvar="CLUSTER_BROKER_CLIENTS", help="Broker address for clients."
)
BrokerAgents = typer.Option(config.BROKER_AGENT_ADDR, envvar="CLUSTER_BROKER_AGENTS", help="Broker address for agents.")
ManagerHeartbeats = typer.Option(
    config.MANAGER_HEARTBEAT_ADDR,
    envvar="CLUSTER_MANAGER_HEARTBEATS",
    help="Manager heartbeat address (agents publish here).",
)
ManagerEvents = typer.Option(
    config.MANAGER_EVENTS_ADDR,
    envvar="CLUSTER_MANAGER_EVENTS",
    help="Manager registry-event address (the broker subscribes).",
)
ManagerQueries = typer.Option(
    config.MANAGER_QUERY_ADDR, envvar="CLUSTER_MANAGER_QUERIES", help="Manager query address."
)
Interval = typer.Option(
    None, "--heartbeat-interval", envvar="CLUSTER_HEARTBEAT_INTERVAL", help="Seconds between heartbeats (default 1)."
)
Liveness = typer.Option(
    None, "--liveness", envvar="CLUSTER_LIVENESS", help="Missed heartbeats before a peer is dead (default 3)."
)
LogLevel = typer.Option("INFO", "--log-level", envvar="CLUSTER_LOG_LEVEL", help="DEBUG, INFO, WARNING or ERROR.")


class LogFormatName(str, enum.Enum):
    text = "text"
    json = "json"


LogFormat = typer.Option(
    LogFormatName.text,
    "--log-format",
    envvar="CLUSTER_LOG_FORMAT",
    help="text, or json: one JSON object a line (time, level, component, agent, message, request_id).",
)
Key = typer.Option(
    None,
    "--key",
    envvar="CLUSTER_KEY",
    help="Key file (`cluster keys`): every bus socket uses CURVE with it. The broker and manager take DIR/server.key "
    "and read DIR/members.json. Without it: the bus in the clear.",
)
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
