"""`cluster config`: the settings a role would run with here (its CLUSTER_* variables over the defaults), and the
README's table of every setting (`--markdown`). Each role's own `--print-config` adds its flags."""

from __future__ import annotations

import typer

from cluster import settings
from cluster.options import print_settings
from cluster.role_settings import ROLES


def config(
    role: str | None = typer.Argument(None, help=f"One of {', '.join(ROLES)} (default: every role)."),
    markdown: bool = typer.Option(
        False, "--markdown", help="Print the table of every setting (flag, variable, default, unit, meaning) instead."
    ),
):
    """Print the effective settings of a role and where each came from (default or environment; a role's own
    --print-config also shows its flags), or with --markdown the README's table of every setting."""
    if markdown:
        typer.echo(settings.markdown(ROLES), nl=False)
        return
    if role is not None and role not in ROLES:
        typer.echo(f"cluster config: no role {role!r}; one of {', '.join(ROLES)}", err=True)
        raise typer.Exit(2)
    for name in [role] if role else list(ROLES):
        try:
            built, origins = settings.load(ROLES[name])
        except settings.SettingsError as exc:
            typer.echo(f"cluster config {name}: {exc}", err=True)
            raise typer.Exit(2) from None
        if role is None:
            typer.echo(f"[{name}]")
        print_settings(built, origins)
