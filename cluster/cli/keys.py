"""`cluster keys`: key directories for CURVE on the bus (cluster/keys.py does the work)."""

from __future__ import annotations

from pathlib import Path

import typer

from cluster import settings
from cluster.role_settings import KeysSettings

keys_app = typer.Typer(no_args_is_help=True, help="Key directories for CURVE on the bus: members, roles, revocation.")
KeyDir = typer.Option(
    None,
    "--key-dir",
    "--dir",
    show_default=False,
    help="The key directory (from `cluster keys init`). [CLUSTER_KEY_DIR; default (none)]",
)


@keys_app.callback()
def keys_group(ctx: typer.Context, directory: Path | None = KeyDir):
    """Key directories for CURVE on the bus: `init DIR`, then `add`, `revoke` and `list` members (--dir DIR)."""
    ctx.obj = directory  # `cluster keys --dir DIR add ...` works too


def _key_dir(ctx: typer.Context, directory: Path | None) -> Path:
    directory = directory or ctx.obj or settings.from_env(KeysSettings).key_dir  # the variable by the one rule
    if directory is None:
        typer.echo("keys: give the key directory with --key-dir DIR (or CLUSTER_KEY_DIR)", err=True)
        raise typer.Exit(2)
    return Path(directory)


def _keys_call(fn, directory: Path, *args):
    from cluster.keys import KeyDirError

    try:
        return fn(directory, *args)
    except KeyDirError as exc:
        typer.echo(f"keys: {exc}", err=True)
        raise typer.Exit(2) from None


@keys_app.command("init")
def keys_init(directory: Path = typer.Argument(..., help="Where to create the key directory.")):
    """Create a key directory: server.key (the broker and manager serve with it), admin.key, and the allow-list."""
    from cluster import keys

    admin = _keys_call(keys.init, directory)
    typer.echo(f"key directory {directory}: server key {directory / 'server.key'}, admin key {directory / 'admin.key'}")
    typer.echo(f"admin public key {admin.public}")


@keys_app.command("add")
def keys_add(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="Member name; its key file is DIR/NAME.key."),
    role: str = typer.Option(..., "--role", help="agent, client or admin."),
    directory: Path = KeyDir,
):
    """Create a member's key file and allow its key for ROLE (takes effect within seconds, no restart)."""
    from cluster import keys

    directory = _key_dir(ctx, directory)
    key = _keys_call(keys.add, directory, name, role)
    typer.echo(f"added {name} ({role}): {directory / (name + '.key')}")
    typer.echo(f"public key {key.public}")


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, name: str = typer.Argument(..., help="Member name."), directory: Path = KeyDir):
    """Remove a member from the allow-list: its connections are refused within seconds."""
    from cluster import keys

    _keys_call(keys.revoke, _key_dir(ctx, directory), name)
    typer.echo(f"revoked {name}")


@keys_app.command("list")
def keys_list(ctx: typer.Context, directory: Path = KeyDir):
    """Members of the key directory and their roles."""
    from cluster import keys

    for name, member in sorted(_keys_call(keys.list_members, _key_dir(ctx, directory)).items()):
        typer.echo(f"{name:24} {member.get('role', '?'):8} {member.get('public', '')}")
