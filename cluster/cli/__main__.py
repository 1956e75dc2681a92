"""python -m cluster.cli: the `cluster` command (as `python -m cluster`)."""

from cluster.cli import main

main()
