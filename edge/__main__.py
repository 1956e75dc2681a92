"""python -m edge [OPTIONS]: the same command as `cluster edge` (options live in cluster/cli.py; --help lists them)."""

from __future__ import annotations

import typer

from cluster import cli


def main(argv: list[str] | None = None) -> None:
    command = typer.main.get_command(cli.app).commands["edge"]
    command.main(args=argv, prog_name="python -m edge")


if __name__ == "__main__":
    main()
