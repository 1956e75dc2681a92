"""The `cluster` command: run each role on its own, or the whole cluster on this machine with `cluster up`.

Every address and timing can come from an option or from an environment variable (CLUSTER_*); `--help` on each
command lists them. One module per group of commands (roles, up, health, deploy, canary, bench, keys); the options
several share are in common.py. The commands are registered here, in the order `cluster --help` lists them.
"""

from __future__ import annotations

import typer

import edge.command
from cluster.cli import bench, canary, deploy, health, keys, roles, show_config, up
from cluster.cli.common import _table
from cluster.cli.deploy import _print_rollout
from cluster.cli.health import _local_address, health_check

__all__ = ["app", "main", "health_check", "_local_address", "_print_rollout", "_table"]

app = typer.Typer(add_completion=False, no_args_is_help=True, help="A model-serving cluster for PyTorch.")
for command in (
    roles.manager,
    roles.broker,
    roles.agent,
    edge.command.edge,  # the same command as `python -m edge`, defined once beside the edge
    up.up,
    health.status,
    health.health,
    deploy.deploy,
    deploy.rollback,
    deploy.undeploy,
    deploy.models,
    canary.canary,
    canary.promote,
    canary.abort,
    canary.rollouts,
    bench.bench,
    show_config.config,
):
    app.command()(command)
app.add_typer(keys.keys_app, name="keys")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
