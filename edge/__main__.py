"""python -m edge [OPTIONS]: the same options as `cluster edge` (edge/command.py; --help lists them)."""

from __future__ import annotations

from edge.command import main

if __name__ == "__main__":
    main()
