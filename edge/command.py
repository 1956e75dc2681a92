"""The edge's command line: `python -m edge` runs it, without importing the cluster's CLI (cluster/cli/).

`cluster edge` is this same command (cluster/cli/ registers `edge` from here); its options are EdgeSettings' flags
(cluster/role_settings.py); `main` runs it.
"""

from __future__ import annotations

import typer

from cluster.options import ReadyFile, need_role, settings_command
from cluster.role_settings import EdgeSettings


@settings_command(EdgeSettings)
def edge(settings: EdgeSettings, ready_file: str | None = ReadyFile):
    """Run the HTTP edge: Open Inference Protocol (KServe V2) REST and gRPC, /metrics, /agents, and the page at /."""
    need_role("edge", what="cluster edge")  # before any import of FastAPI: say what to install
    import edge  # run_edge looked up on the package when called (tests replace it there)

    edge.run_edge(settings, ready_file=ready_file)


def command():
    """The click command of `edge` (a one-command Typer app is the command itself: no subcommand name)."""
    app = typer.Typer(add_completion=False)
    app.command(name="edge")(edge)
    return typer.main.get_command(app)


def main(argv: list[str] | None = None) -> None:
    """Run the edge command with `argv` (default: sys.argv[1:])."""
    command().main(args=argv, prog_name="python -m edge")
